import { Command, CommanderError } from 'commander';
import { FerryError, errorMessage } from '../errors.js';
import { registerCapture } from './capture.js';
import { registerCheck } from './check.js';
import { registerCompare } from './compare.js';
import { registerConvert } from './convert.js';
import { registerInfo } from './info.js';
import { registerInject } from './inject.js';
import { registerInspect } from './inspect.js';
import { registerMap } from './map.js';
import { registerMeasure } from './measure.js';
import { registerMigrate } from './migrate.js';
import { registerServe } from './serve.js';
import { registerWorker } from './worker.js';

/** Exit status for failures, per command; compare uses 2 like qemu-img, check 1 ("could not run"). */
const ERROR_EXIT: Record<string, number> = { compare: 2, check: 1 };

/** Each command's registration; a name maps to the function that defines it (migrate defines two). */
const COMMANDS: Array<[names: string[], register: (program: Command) => void]> = [
  [['info'], registerInfo],
  [['convert'], registerConvert],
  [['check'], registerCheck],
  [['compare'], registerCompare],
  [['map'], registerMap],
  [['measure'], registerMeasure],
  [['migrate', 'migrate-listen'], registerMigrate],
  [['inspect'], registerInspect],
  [['inject'], registerInject],
  [['capture'], registerCapture],
  [['serve'], registerServe],
  [['worker'], registerWorker],
];

/**
 * The CLI. Given the command about to run, only that command is defined: building every command's
 * options costs more start-up time than a small conversion takes.
 */
export function buildProgram(only?: string): Command {
  const program = new Command();
  program
    .name('ferry')
    .description(
      'Move machines into and between hypervisors.\n' +
        '\n' +
        'Disk images: info, convert, check, compare, map and measure take the flags qemu-img users know. ' +
        "Formats: 'ferry formats' lists them with their creation options.",
    )
    .version(process.env.npm_package_version ?? '0.1.0')
    .option('--debug', 'show stack traces on errors')
    .showHelpAfterError('(run with --help for usage)')
    .exitOverride();

  const selected = COMMANDS.filter(([names]) => only !== undefined && names.includes(only));
  for (const [, register] of selected.length ? selected : COMMANDS) register(program);
  if (selected.length) return program;

  program
    .command('formats')
    .summary('list the disk formats and their creation options')
    .action(async () => {
      const { formatDrivers } = await import('../convert/registry.js');
      for (const d of formatDrivers) {
        const names = [d.name, ...d.aliases].join(', ');
        process.stdout.write(`${names}: ${d.description}${d.create ? '' : ' (read-only)'}\n`);
        for (const o of d.createOptions) process.stdout.write(`    -o ${o.name}=<${o.type}>  ${o.description}\n`);
      }
    });
  return program;
}

export async function main(argv: string[]): Promise<void> {
  const program = buildProgram(argv[2]);
  const debug = argv.includes('--debug');
  try {
    await program.parseAsync(argv);
  } catch (err) {
    if (err instanceof CommanderError) {
      // Help and version exit 0; usage errors were already printed by commander.
      process.exitCode = err.exitCode;
      return;
    }
    const command = argv[2] ?? '';
    process.stderr.write(`ferry ${command}: ${describe(err)}\n`);
    if (debug && err instanceof Error && err.stack) process.stderr.write(err.stack + '\n');
    process.exitCode = ERROR_EXIT[command] ?? 1;
  }
}

function describe(err: unknown): string {
  if (err instanceof FerryError) return err.describe();
  const e = err as NodeJS.ErrnoException;
  if (e?.code && e.path) return `${e.path}: ${systemMessage(e)}`;
  return errorMessage(err);
}

function systemMessage(e: NodeJS.ErrnoException): string {
  switch (e.code) {
    case 'ENOENT':
      return 'No such file or directory';
    case 'EACCES':
      return 'Permission denied';
    case 'EISDIR':
      return 'Is a directory';
    case 'ENOSPC':
      return 'No space left on device';
    default:
      return e.message;
  }
}
