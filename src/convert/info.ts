import { stat } from 'node:fs/promises';
import { dirname, isAbsolute, resolve } from 'node:path';
import type { ImageLayer } from './disk.js';
import { openDisk } from './open.js';

/** What `info` reports per image, named as qemu-img's JSON output names it. */
export interface ImageInfo {
  'virtual-size': number;
  filename: string;
  'cluster-size'?: number;
  format: string;
  'actual-size': number;
  'format-specific'?: { type: string; data: Record<string, unknown> };
  'full-backing-filename'?: string;
  'backing-filename'?: string;
  'backing-filename-format'?: string;
  'dirty-flag': boolean;
}

export interface InfoOptions {
  format?: string;
  backingChain?: boolean;
  allowExternal?: boolean;
}

/** Describes an image, or with `backingChain` every image of its chain, top first. */
export async function imageInfo(path: string, opts: InfoOptions = {}): Promise<ImageInfo[]> {
  const disk = await openDisk(path, { format: opts.format, allowExternal: opts.allowExternal, noBacking: !opts.backingChain });
  try {
    return await Promise.all(disk.layers.map((layer) => describeLayer(layer)));
  } finally {
    await disk.close();
  }
}

async function describeLayer(layer: ImageLayer): Promise<ImageInfo> {
  const st = await stat(layer.path);
  const details = layer.details();
  // Keys in the order qemu-img prints them, so the JSON reads the same side by side.
  const info: ImageInfo = { 'virtual-size': layer.virtualSize, filename: layer.path } as ImageInfo;
  if (details.clusterSize) info['cluster-size'] = details.clusterSize;
  info.format = layer.format;
  info['actual-size'] = st.blocks * 512;
  if (details.specific) info['format-specific'] = details.specific;
  if (layer.backing) {
    const name = layer.backing.name;
    info['full-backing-filename'] = isAbsolute(name) ? name : resolve(dirname(layer.path), name);
    info['backing-filename'] = name;
    if (layer.backing.format) info['backing-filename-format'] = layer.backing.format;
  }
  info['dirty-flag'] = details.dirty ?? false;
  return info;
}
