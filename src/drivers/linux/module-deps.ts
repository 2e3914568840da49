import { moduleNameOf, normaliseModule } from '../initramfs.js';

/**
 * A kernel's module metadata as depmod leaves it in /lib/modules/VERSION, read from the text files:
 * what `modprobe --show-depends` consults when mkinitramfs adds a module (modprobe.d configuration
 * aside). Names are normalised ("-" → "_").
 */
export interface ModuleIndex {
  /** Module name → its file (relative to the modules folder) and the files it depends on. */
  modules: Map<string, { path: string; deps: string[] }>;
  /** Module name → the names its softdep pre: and post: lists give (module names or aliases). */
  softdeps: Map<string, string[]>;
  builtin: Set<string>;
  /** From modules.alias; only needed when a softdep names an alias. */
  aliases?: { pattern: RegExp; module: string }[];
}

export function parseModulesDep(text: string): ModuleIndex['modules'] {
  const modules: ModuleIndex['modules'] = new Map();
  for (const line of text.split('\n')) {
    const colon = line.indexOf(':');
    if (colon < 0) continue;
    const path = line.slice(0, colon).trim();
    const name = moduleNameOf(path);
    if (name) modules.set(name, { path, deps: line.slice(colon + 1).trim().split(/\s+/).filter(Boolean) });
  }
  return modules;
}

/** `softdep MODULE pre: A B post: C`; words before the first pre:/post: are ignored, as kmod does. */
export function parseSoftdeps(text: string): ModuleIndex['softdeps'] {
  const softdeps: ModuleIndex['softdeps'] = new Map();
  for (const line of text.split('\n')) {
    const words = line.trim().split(/\s+/);
    if (words[0] !== 'softdep' || !words[1]) continue;
    const names: string[] = [];
    let listing = false;
    for (const w of words.slice(2)) {
      if (w === 'pre:' || w === 'post:') listing = true;
      else if (listing) names.push(normaliseModule(w));
    }
    const module = normaliseModule(words[1]);
    softdeps.set(module, [...(softdeps.get(module) ?? []), ...names]);
  }
  return softdeps;
}

export function parseBuiltin(text: string): Set<string> {
  return new Set(text.split('\n').map((l) => moduleNameOf(l.trim())).filter((n): n is string => !!n));
}

/** `alias PATTERN MODULE` lines; patterns are fnmatch globs, as kmod matches them. */
export function parseAliases(text: string): NonNullable<ModuleIndex['aliases']> {
  const aliases: NonNullable<ModuleIndex['aliases']> = [];
  for (const line of text.split('\n')) {
    const m = /^alias\s+(\S+)\s+(\S+)/.exec(line);
    if (m) aliases.push({ pattern: globToRegExp(m[1]!), module: normaliseModule(m[2]!) });
  }
  return aliases;
}

function globToRegExp(glob: string): RegExp {
  let re = '';
  for (let i = 0; i < glob.length; i++) {
    const c = glob[i]!;
    if (c === '*') re += '.*';
    else if (c === '?') re += '.';
    else if (c === '[') {
      const close = glob.indexOf(']', i + 2);
      if (close < 0) re += '\\[';
      else {
        re += '[' + glob.slice(i + 1, close).replace(/^!/, '^').replace(/\\/g, '\\\\') + ']';
        i = close;
      }
    } else re += c.replace(/[.+^${}()|\\\]]/g, '\\$&');
  }
  return new RegExp(`^${re}$`);
}

/**
 * Modules mkinitramfs adds beside others whatever modules.dep says (its hidden_dep_add_modules table
 * in hook-functions): dependencies that are looked up at run time, not linked.
 */
const HIDDEN_DEPENDENCIES: Record<string, string[]> = {
  libcrc32c: ['crc32c'],
  btrfs: ['crc32c'],
  f2fs: ['crc32'],
  mlx4_core: ['mlx4_ib'],
  mlx5_core: ['mlx5_ib'],
  i8042: ['psmouse'],
  nvme: ['vmd'],
};

export interface Closure {
  /** Module files (relative to the modules folder), each once, in discovery order. */
  paths: string[];
  /** Softdep names that are neither a module nor built in: aliases, resolvable with `aliases`. */
  unresolvedAliases: string[];
}

/**
 * Every module file `names` need: each module, its modules.dep dependencies (already transitive),
 * softdeps and hidden dependencies, recursively; built-in modules need no file. A softdep that is an
 * alias stands for every module the alias matches, as in modprobe. Requested names that do not
 * exist are skipped (the caller reports them).
 */
export function moduleClosure(index: ModuleIndex, names: string[]): Closure {
  const paths: string[] = [];
  const seen = new Set<string>();
  const unresolvedAliases: string[] = [];
  const queue = names.map((n) => ({ name: normaliseModule(n), soft: false }));
  while (queue.length) {
    const { name, soft } = queue.shift()!;
    if (seen.has(name)) continue;
    seen.add(name);
    if (index.builtin.has(name)) continue;
    const module = index.modules.get(name);
    if (!module) {
      if (!soft) continue;
      if (!index.aliases) {
        unresolvedAliases.push(name);
        continue;
      }
      for (const a of index.aliases) if (a.pattern.test(name)) queue.push({ name: a.module, soft: false });
      continue;
    }
    for (const path of [module.path, ...module.deps]) {
      if (!paths.includes(path)) paths.push(path);
      const dep = moduleNameOf(path)!;
      if (dep !== name) queue.push({ name: dep, soft: false });
    }
    for (const s of index.softdeps.get(name) ?? []) queue.push({ name: s, soft: true });
    for (const h of HIDDEN_DEPENDENCIES[name] ?? []) queue.push({ name: h, soft: false });
  }
  return { paths, unresolvedAliases };
}
