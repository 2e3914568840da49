import { EventEmitter } from 'node:events';
import { Redis } from 'ioredis';
import type { JobPatch, JobRecord, JobState } from './model.js';
import type { CreateOutcome, IdempotencyClaim, JobListQuery, JobPage, JobStore } from './store.js';

const PREFIX = 'ferry';
const CHANGES_CHANNEL = `${PREFIX}:job-changes`;
const jobKey = (id: string) => `${PREFIX}:job:${id}`;
const logKey = (id: string) => `${PREFIX}:job:${id}:log`;
const idemKey = (key: string) => `${PREFIX}:idempotency:${key}`;
/** All jobs, and the jobs in each state, as sorted sets scored by creation time (for paging). */
const ALL_JOBS = `${PREFIX}:jobs`;
const stateKey = (state: string) => `${PREFIX}:jobs:${state}`;

/**
 * Creates the job hash and its index entries, unless the idempotency key (if any) is taken: then returns
 * the id and fingerprint that hold it. KEYS: job hash, all-jobs set, state set, idempotency key.
 * ARGV: id, score, use-claim flag, claim JSON, then field/value pairs.
 */
const CREATE_SCRIPT = `
if ARGV[3] == '1' then
  local taken = redis.call('GET', KEYS[4])
  if taken then return taken end
  redis.call('SET', KEYS[4], ARGV[4])
end
local fields = {}
for i = 5, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
return false
`;

/**
 * Applies a patch unless the job is finished, moves it between state sets, and publishes the new record.
 * KEYS: job hash. ARGV: id, new state JSON ('' if unchanged), then field/value pairs. Returns HGETALL or nil.
 */
const UPDATE_SCRIPT = `
local state = redis.call('HGET', KEYS[1], 'state')
if not state or state == '"completed"' or state == '"failed"' or state == '"cancelled"' then return false end
local fields = {}
for i = 3, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
if ARGV[2] ~= '' and ARGV[2] ~= state then
  local score = redis.call('ZSCORE', '${ALL_JOBS}', ARGV[1])
  redis.call('ZREM', '${PREFIX}:jobs:' .. cjson.decode(state), ARGV[1])
  redis.call('ZADD', '${PREFIX}:jobs:' .. cjson.decode(ARGV[2]), score, ARGV[1])
end
local all = redis.call('HGETALL', KEYS[1])
local record = {}
for i = 1, #all, 2 do record[all[i]] = all[i + 1] end
redis.call('PUBLISH', '${CHANGES_CHANNEL}', cjson.encode(record))
return all
`;

/** Each record field is stored JSON-encoded in one hash field, so a patch writes only what changed. */
function toFields(values: Record<string, unknown>): string[] {
  return Object.entries(values)
    .filter(([, v]) => v !== undefined)
    .flatMap(([k, v]) => [k, JSON.stringify(v)]);
}

function fromFields(fields: Record<string, string>): JobRecord {
  return Object.fromEntries(Object.entries(fields).map(([k, v]) => [k, JSON.parse(v)])) as JobRecord;
}

function pairsToObject(flat: string[]): Record<string, string> {
  const out: Record<string, string> = {};
  for (let i = 0; i < flat.length; i += 2) out[flat[i]] = flat[i + 1];
  return out;
}

/** The scripts, registered once per connection: calls send their SHA (EVALSHA), not their text. */
interface ScriptedRedis extends Redis {
  createJob(...keysAndArgs: Array<string | number>): Promise<string | null>;
  updateJob(...keysAndArgs: Array<string | number>): Promise<string[] | null>;
}

function withScripts(redis: Redis): ScriptedRedis {
  redis.defineCommand('createJob', { numberOfKeys: 4, lua: CREATE_SCRIPT });
  redis.defineCommand('updateJob', { numberOfKeys: 1, lua: UPDATE_SCRIPT });
  return redis as ScriptedRedis;
}

/**
 * Job records in Redis, shared by the API and every worker. Updates are Lua scripts, so the "finished
 * records are final" rule holds across processes, and each update publishes the new record to every
 * process that watches (the API, for its events streams and metrics).
 */
export class RedisJobStore implements JobStore {
  private readonly events = new EventEmitter();

  private constructor(
    private readonly redis: ScriptedRedis,
    private readonly subscriber: Redis | undefined,
  ) {
    this.events.setMaxListeners(0);
  }

  /** `watch` opens a second connection that receives every job change (the API needs it; workers do not). */
  static async connect(url: string, opts: { watch: boolean }): Promise<RedisJobStore> {
    const redis = withScripts(new Redis(url, { maxRetriesPerRequest: null }));
    let subscriber: Redis | undefined;
    if (opts.watch) {
      subscriber = new Redis(url, { maxRetriesPerRequest: null });
      await subscriber.subscribe(CHANGES_CHANNEL);
    }
    const store = new RedisJobStore(redis, subscriber);
    subscriber?.on('message', (_channel: string, message: string) => {
      store.events.emit('change', fromFields(JSON.parse(message) as Record<string, string>));
    });
    return store;
  }

  async create(record: JobRecord, claim?: IdempotencyClaim): Promise<CreateOutcome> {
    const claimValue = JSON.stringify({ id: record.id, fingerprint: claim?.fingerprint });
    const keys = [jobKey(record.id), ALL_JOBS, stateKey(record.state), idemKey(claim?.key ?? '')];
    const taken = await this.redis.createJob(...keys, record.id, Date.parse(record.createdAt), claim ? '1' : '0', claimValue, ...toFields({ ...record }));
    if (taken) {
      const earlier = JSON.parse(taken) as { id: string; fingerprint: string };
      return { created: false, record: (await this.get(earlier.id))!, fingerprintMatches: earlier.fingerprint === claim?.fingerprint };
    }
    await this.redis.publish(CHANGES_CHANNEL, JSON.stringify(pairsToObject(toFields({ ...record }))));
    return { created: true, record };
  }

  async findByIdempotencyKey(key: string): Promise<{ record: JobRecord; fingerprint: string } | undefined> {
    const value = await this.redis.get(idemKey(key));
    if (!value) return undefined;
    const { id, fingerprint } = JSON.parse(value) as { id: string; fingerprint: string };
    const record = await this.get(id);
    return record && { record, fingerprint };
  }

  async get(id: string): Promise<JobRecord | undefined> {
    const fields = await this.redis.hgetall(jobKey(id));
    return Object.keys(fields).length ? fromFields(fields) : undefined;
  }

  async list(query: JobListQuery): Promise<JobPage> {
    const index = query.state ? stateKey(query.state) : ALL_JOBS;
    const total = await this.redis.zcard(index);
    if (query.limit === 0) return { jobs: [], total };
    const ids = await this.redis.zrevrange(index, query.offset, query.offset + query.limit - 1);
    return { jobs: await this.records(ids), total };
  }

  async unfinished(): Promise<JobRecord[]> {
    const states: JobState[] = ['queued', 'running'];
    const scored = (await Promise.all(states.map((s) => this.redis.zrange(stateKey(s), 0, -1, 'WITHSCORES')))).flatMap((flat) =>
      Object.entries(pairsToObject(flat)).map(([id, score]) => ({ id, score: Number(score) })),
    );
    return this.records(scored.sort((a, b) => a.score - b.score).map((s) => s.id));
  }

  async update(id: string, patch: JobPatch): Promise<JobRecord | undefined> {
    const newState = patch.state === undefined ? '' : JSON.stringify(patch.state);
    const result = await this.redis.updateJob(jobKey(id), id, newState, ...toFields(patch));
    return result ? fromFields(pairsToObject(result)) : undefined;
  }

  async appendLog(id: string, line: string): Promise<void> {
    await this.redis.append(logKey(id), line);
  }

  async readLog(id: string): Promise<string> {
    return (await this.redis.get(logKey(id))) ?? '';
  }

  subscribe(listener: (record: JobRecord) => void): () => void {
    if (!this.subscriber) throw new Error('this job store was opened without watch: it receives no changes');
    this.events.on('change', listener);
    return () => this.events.off('change', listener);
  }

  async close(): Promise<void> {
    await Promise.all([this.redis.quit(), this.subscriber?.quit()]);
  }

  private async records(ids: string[]): Promise<JobRecord[]> {
    if (!ids.length) return [];
    const pipeline = this.redis.pipeline();
    for (const id of ids) pipeline.hgetall(jobKey(id));
    const results = (await pipeline.exec()) ?? [];
    return results.map(([, fields]) => fields as Record<string, string>).filter((f) => Object.keys(f).length > 0).map(fromFields);
  }
}
