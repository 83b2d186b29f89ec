/* Test harness: runs model_invoke on every input in inputs.bin and writes outputs.bin.
 * Host: stdio, paths from argv. Cortex-M (under QEMU): ARM semihosting, fixed file names in
 * QEMU's working directory, exit code through SYS_EXIT_EXTENDED.
 * tp_marker_begin/tp_marker_end bracket each inference for the instruction-counting plugin; a
 * non-zero model_invoke status ends the run with exit code 5. */
#include <stdint.h>
#include <string.h>

#include "model.h"

/* I/O staging lives outside the board's SRAM budget (boards.py places .harness_io in spare
 * emulator RAM): on a device the input would come from a sensor buffer the app owns. */
#define TP_HARNESS_IO __attribute__((section(".harness_io")))
static model_input_t input_buffer[(MODEL_INPUT_BYTES + sizeof(model_input_t) - 1) / sizeof(model_input_t)] TP_HARNESS_IO;
static model_output_t output_buffer[(MODEL_OUTPUT_BYTES + sizeof(model_output_t) - 1) / sizeof(model_output_t)] TP_HARNESS_IO;

__attribute__((noinline)) void tp_marker_begin(void) { __asm__ volatile("" ::: "memory"); }
__attribute__((noinline)) void tp_marker_end(void) { __asm__ volatile("" ::: "memory"); }
__attribute__((noinline)) void tp_layer_marker(void) { __asm__ volatile("" ::: "memory"); }

#if defined(__arm__) && !defined(__linux__)
/* ---- ARM semihosting (bkpt 0xAB on M-profile) ---- */
enum { SYS_OPEN = 0x01, SYS_CLOSE = 0x02, SYS_WRITE0 = 0x04, SYS_WRITE = 0x05, SYS_READ = 0x06,
       SYS_FLEN = 0x0C, SYS_EXIT_EXTENDED = 0x20 };

static int32_t semihost(int32_t op, const void *arg) {
  register int32_t r0 __asm__("r0") = op;
  register const void *r1 __asm__("r1") = arg;
  __asm__ volatile("bkpt 0xAB" : "+r"(r0) : "r"(r1) : "memory");
  return r0;
}

void tp_exit(int32_t code) {
  const uint32_t block[2] = {0x20026u /* ADP_Stopped_ApplicationExit */, (uint32_t)code};
  semihost(SYS_EXIT_EXTENDED, block);
  for (;;) {
  }
}

static void say(const char *s) { semihost(SYS_WRITE0, s); }

static int32_t open_file(const char *name, int32_t mode) {
  const uint32_t args[3] = {(uint32_t)name, (uint32_t)mode, (uint32_t)strlen(name)};
  return semihost(SYS_OPEN, args);
}

static int32_t transfer(int32_t op, int32_t fd, void *buf, int32_t n) { /* bytes NOT transferred */
  const uint32_t args[3] = {(uint32_t)fd, (uint32_t)buf, (uint32_t)n};
  return semihost(op, args);
}

int main(void) {
  const int32_t in = open_file("inputs.bin", 1 /* rb */), out = open_file("outputs.bin", 5 /* wb */);
  if (in < 0 || out < 0) {
    say("harness: cannot open inputs.bin / outputs.bin\n");
    return 2;
  }
  const uint32_t flen_args[1] = {(uint32_t)in};
  const int32_t count = semihost(SYS_FLEN, flen_args) / MODEL_INPUT_BYTES;
  for (int32_t i = 0; i < count; i++) {
    if (transfer(SYS_READ, in, input_buffer, MODEL_INPUT_BYTES) != 0) return 3;
    tp_marker_begin();
    const int32_t status = model_invoke(input_buffer, output_buffer);
    tp_marker_end();
    if (status != 0) {
      say("harness: model_invoke reported a kernel error\n");
      return 5;
    }
    if (transfer(SYS_WRITE, out, output_buffer, MODEL_OUTPUT_BYTES) != 0) return 4;
  }
  const uint32_t close_in[1] = {(uint32_t)in}, close_out[1] = {(uint32_t)out};
  semihost(SYS_CLOSE, close_in);
  semihost(SYS_CLOSE, close_out);
  return 0;
}

#else
/* ---- host ---- */
#include <stdio.h>

int main(int argc, char **argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: %s INPUTS.bin OUTPUTS.bin\n", argv[0]);
    return 2;
  }
  FILE *in = fopen(argv[1], "rb"), *out = fopen(argv[2], "wb");
  if (!in || !out) {
    fprintf(stderr, "harness: cannot open %s / %s\n", argv[1], argv[2]);
    return 2;
  }
  while (fread(input_buffer, 1, MODEL_INPUT_BYTES, in) == MODEL_INPUT_BYTES) {
    tp_marker_begin();
    const int32_t status = model_invoke(input_buffer, output_buffer);
    tp_marker_end();
    if (status != 0) {
      fprintf(stderr, "harness: model_invoke failed in op %d\n", (int)(status - 1));
      return 5;
    }
    if (fwrite(output_buffer, 1, MODEL_OUTPUT_BYTES, out) != MODEL_OUTPUT_BYTES) return 4;
  }
  fclose(in);
  fclose(out);
  return 0;
}
#endif
