/* QEMU TCG plugin (plugin API v1): counts the guest instructions executed between each
 * execution of the `begin` address and the next execution of the `end` address.
 * Arguments: begin=0xADDR,end=0xADDR,out=PATH[,mark=0xADDR,marks=PATH]. Writes one count per
 * line to PATH at exit; with `mark`, also the running count at every execution of `mark`
 * inside a begin/end window (per-layer profiles) to the `marks` file.
 * Every instruction gets an exec callback, so the count is exact (no TB-granularity error). */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qemu_plugin_api.h"

QEMU_PLUGIN_EXPORT int qemu_plugin_version = QEMU_PLUGIN_VERSION;

static uint64_t begin_addr, end_addr, mark_addr;
static char out_path[4096], marks_path[4096];
static uint64_t marks[1 << 20];
static size_t n_marks;
static uint64_t executed;      /* instructions since the last begin marker */
static int counting;
static uint64_t counts[1 << 16];
static size_t n_counts;

static void on_insn(unsigned int vcpu, void *userdata) {
  (void)vcpu;
  (void)userdata;
  executed += counting;
}

static void on_begin(unsigned int vcpu, void *userdata) {
  (void)vcpu;
  (void)userdata;
  counting = 1;
  executed = 0;
}

static void on_mark(unsigned int vcpu, void *userdata) {
  (void)vcpu;
  (void)userdata;
  if (counting && n_marks < sizeof(marks) / sizeof(marks[0])) marks[n_marks++] = executed;
  executed += counting;
}

static void on_end(unsigned int vcpu, void *userdata) {
  (void)vcpu;
  (void)userdata;
  if (counting && n_counts < sizeof(counts) / sizeof(counts[0])) counts[n_counts++] = executed;
  counting = 0;
}

static void on_translate(qemu_plugin_id_t id, struct qemu_plugin_tb *tb) {
  (void)id;
  size_t n = qemu_plugin_tb_n_insns(tb);
  for (size_t i = 0; i < n; i++) {
    struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, i);
    uint64_t vaddr = qemu_plugin_insn_vaddr(insn);
    qemu_plugin_vcpu_udata_cb_t cb = on_insn;
    if (vaddr == begin_addr) cb = on_begin;
    else if (vaddr == end_addr) cb = on_end;
    else if (mark_addr && vaddr == mark_addr) cb = on_mark;
    qemu_plugin_register_vcpu_insn_exec_cb(insn, cb, QEMU_PLUGIN_CB_NO_REGS, NULL);
  }
}

static void write_counts(qemu_plugin_id_t id, void *userdata) {
  (void)id;
  (void)userdata;
  FILE *f = fopen(out_path, "w");
  if (!f) return;
  for (size_t i = 0; i < n_counts; i++) fprintf(f, "%" PRIu64 "\n", counts[i]);
  fclose(f);
  if (marks_path[0] && (f = fopen(marks_path, "w")) != NULL) {
    for (size_t i = 0; i < n_marks; i++) fprintf(f, "%" PRIu64 "\n", marks[i]);
    fclose(f);
  }
}

QEMU_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc, char **argv) {
  (void)info;
  for (int i = 0; i < argc; i++) {
    if (strncmp(argv[i], "begin=", 6) == 0) begin_addr = strtoull(argv[i] + 6, NULL, 0);
    else if (strncmp(argv[i], "end=", 4) == 0) end_addr = strtoull(argv[i] + 4, NULL, 0);
    else if (strncmp(argv[i], "out=", 4) == 0) snprintf(out_path, sizeof(out_path), "%s", argv[i] + 4);
    else if (strncmp(argv[i], "mark=", 5) == 0) mark_addr = strtoull(argv[i] + 5, NULL, 0);
    else if (strncmp(argv[i], "marks=", 6) == 0) snprintf(marks_path, sizeof(marks_path), "%s", argv[i] + 6);
    else {
      fprintf(stderr, "insn_count: unknown argument %s (expected begin=, end=, out=, mark=, marks=)\n", argv[i]);
      return -1;
    }
  }
  if (!begin_addr || !end_addr || !out_path[0]) {
    fprintf(stderr, "insn_count: needs begin=0xADDR,end=0xADDR,out=PATH\n");
    return -1;
  }
  qemu_plugin_register_vcpu_tb_trans_cb(id, on_translate);
  qemu_plugin_register_atexit_cb(id, write_counts, NULL);
  return 0;
}
