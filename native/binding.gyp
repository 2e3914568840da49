{
  "targets": [
    {
      "target_name": "ferry_native",
      "sources": ["ferry_native.c", "crc32c.c", "codec.c"],
      "cflags": ["-O3", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
      "defines": ["_GNU_SOURCE", "_FILE_OFFSET_BITS=64", "NAPI_VERSION=8"],
      "libraries": ["-lzstd", "-lz"]
    }
  ]
}
