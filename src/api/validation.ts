import type { FastifySchemaCompiler, FastifySchemaValidationError } from 'fastify';
import type { SchemaErrorDataVar } from 'fastify/types/schema.js';
import { TypeBoxValidatorCompiler } from '@fastify/type-provider-typebox';
import type { TSchema } from 'typebox';
import { Compile } from 'typebox/compile';

/** A `oneOf` whose branches are told apart by one property, as OpenAPI's discriminator describes. */
interface DiscriminatedSchema {
  oneOf: Array<TSchema & { properties: Record<string, { const: string }> }>;
  discriminator: { propertyName: string };
}

function isDiscriminated(schema: unknown): schema is DiscriminatedSchema {
  return typeof schema === 'object' && schema !== null && 'discriminator' in schema && 'oneOf' in schema;
}

function error(instancePath: string, keyword: string, message: string, params: Record<string, unknown> = {}): FastifySchemaValidationError {
  return { keyword, instancePath, schemaPath: '#', params, message };
}

/**
 * TypeBox validation, with discriminated unions checked against the one branch the discriminator picks:
 * "target.format: must be string" instead of every branch's complaints at once. Bodies are validated
 * as sent (no type coercion); query strings and params are converted ("10" → 10) first.
 */
export const validatorCompiler: FastifySchemaCompiler<TSchema> = (route) => {
  const { schema } = route;
  if (!isDiscriminated(schema)) return TypeBoxValidatorCompiler(route);
  const property = schema.discriminator.propertyName;
  const branches = new Map(schema.oneOf.map((branch) => [branch.properties[property].const, Compile(branch)]));
  return (value: unknown) => {
    if (typeof value !== 'object' || value === null || Array.isArray(value)) return { error: [error('', 'type', 'must be a JSON object')] };
    const tag = (value as Record<string, unknown>)[property];
    const branch = typeof tag === 'string' ? branches.get(tag) : undefined;
    if (!branch) return { error: [error(`/${property}`, 'discriminator', `must be one of ${[...branches.keys()].join(', ')}`)] };
    return branch.Check(value) ? { value } : { error: branch.Errors(value) as FastifySchemaValidationError[] };
  };
};

/** Turns validation errors into one line that names each field and what is wrong with it. */
export function formatValidationErrors(errors: FastifySchemaValidationError[], dataVar: SchemaErrorDataVar): Error {
  const lines = new Set<string>();
  for (const e of errors) {
    const at = [dataVar, ...e.instancePath.split('/').filter(Boolean)].join('.');
    const params = e.params as Record<string, unknown>;
    // TypeBox reports an unknown property twice: as "schema is false" on it and as additionalProperties on its parent.
    if (e.keyword === 'boolean') continue;
    if (e.keyword === 'additionalProperties') {
      for (const name of params.additionalProperties as string[]) lines.add(`${at}: unknown field '${name}'`);
    } else if (e.keyword === 'enum') {
      lines.add(`${at}: must be one of ${(params.allowedValues as unknown[]).join(', ')}`);
    } else if (e.keyword === 'required') {
      lines.add(`${at}: missing required field ${(params.requiredProperties as string[]).map((n) => `'${n}'`).join(', ')}`);
    } else {
      lines.add(`${at}: ${e.message}`);
    }
  }
  return new Error([...lines].join('; '));
}
