import { Type } from 'typebox';
import type { UnavailableJobHandler } from '../handler.js';

/**
 * P2V: capture a running machine's disks over SSH, convert them, inject the target hypervisor's drivers.
 * The request is fixed here so clients can be written against it; the stages arrive with the capture
 * module (issue 4) and driver injection (issue 6). Until then a submission is refused with 501.
 */
export const CaptureJobSchema = Type.Object(
  {
    type: Type.Literal('capture'),
    source: Type.Object(
      {
        host: Type.String({ minLength: 1, description: 'SSH host name or address' }),
        port: Type.Optional(Type.Integer({ minimum: 1, maximum: 65535, description: 'SSH port; default 22' })),
        user: Type.String({ minLength: 1 }),
        credential: Type.String({ minLength: 1, description: 'id of a stored credential (POST /v1/credentials)' }),
        disk: Type.String({ minLength: 1, description: "a block device such as /dev/sda, or 'all' for every disk" }),
      },
      { additionalProperties: false },
    ),
    target: Type.Object(
      {
        path: Type.String({ minLength: 1, maxLength: 4096, description: "output image, relative to the data dir; with disk 'all', a folder that receives one image per disk" }),
        format: Type.String({ minLength: 1 }),
        options: Type.Optional(Type.Record(Type.String(), Type.Union([Type.String(), Type.Number(), Type.Boolean()]))),
        compress: Type.Optional(Type.Boolean()),
      },
      { additionalProperties: false },
    ),
    injectDrivers: Type.Optional(Type.Boolean({ description: "inject the target hypervisor's drivers after conversion; default true" })),
  },
  { additionalProperties: false, title: 'CaptureJob', description: 'P2V: capture a machine over SSH → convert → inject drivers' },
);

export const captureJob: UnavailableJobHandler = {
  type: 'capture',
  summary: 'P2V: capture a running machine over SSH, convert, inject drivers',
  schema: CaptureJobSchema,
  stageNames: ['capture', 'convert', 'inject'],
  reason: 'capture jobs need the capture module (issue 4) and driver injection (issue 6), which this build does not include',
};
