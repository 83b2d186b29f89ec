"""Board profiles: core, FPU, SRAM and flash budgets, the QEMU machine that emulates the core,
and the linker script that places code/weights in flash and the arena and stack in SRAM.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Board:
    name: str
    cpu: str  # -mcpu
    fpu: str  # -mfpu
    sram_bytes: int
    flash_bytes: int
    clock_hz: int
    qemu_machine: str  # a QEMU machine with the same core (memory map of the MPS2 FPGA images)
    stack_bytes: int = 8 * 1024  # reserved for the call stack and the harness buffers' slack

    @property
    def cflags(self) -> list[str]:
        return [f"-mcpu={self.cpu}", "-mthumb", "-mfloat-abi=hard", f"-mfpu={self.fpu}"]

    def check_fit(self, sram_bytes: int, flash_bytes: int) -> list[str]:
        """Over-budget messages, one per region (empty when the model fits)."""
        problems = []
        sram_need = sram_bytes + self.stack_bytes
        if sram_need > self.sram_bytes:
            problems.append(
                f"SRAM: needs {sram_need} B (arena {sram_bytes} + stack {self.stack_bytes}) but {self.name} has "
                f"{self.sram_bytes} B: over by {sram_need - self.sram_bytes} B"
            )
        if flash_bytes > self.flash_bytes:
            problems.append(
                f"flash: needs {flash_bytes} B but {self.name} has {self.flash_bytes} B: over by "
                f"{flash_bytes - self.flash_bytes} B"
            )
        return problems

    def linker_script(self) -> str:
        # MPS2 images map 4 MB of code SRAM at 0x0 and 4 MB of data SRAM at 0x20000000; the
        # board's flash and SRAM sizes are imposed as region lengths, so ld rejects what won't
        # fit. The test harness's input/output staging goes to spare RAM above 2 MB (HARNESS).
        return f"""/* {self.name}: {self.flash_bytes} B flash, {self.sram_bytes} B SRAM ({self.cpu}) */
ENTRY(Reset_Handler)
MEMORY
{{
  FLASH (rx)  : ORIGIN = 0x00000000, LENGTH = {self.flash_bytes}
  RAM   (rwx) : ORIGIN = 0x20000000, LENGTH = {self.sram_bytes}
  HARNESS (rw) : ORIGIN = 0x20200000, LENGTH = 0x200000
}}
_estack = ORIGIN(RAM) + LENGTH(RAM);
SECTIONS
{{
  .isr_vector : {{ KEEP(*(.isr_vector)) }} > FLASH
  .text : {{ *(.text*) *(.rodata*) . = ALIGN(4); }} > FLASH
  .ARM.exidx : {{ *(.ARM.exidx*) }} > FLASH
  _sidata = LOADADDR(.data);
  .data : {{ _sdata = .; *(.data*) . = ALIGN(4); _edata = .; }} > RAM AT > FLASH
  .bss (NOLOAD) : {{ _sbss = .; *(.bss*) *(COMMON) . = ALIGN(4); _ebss = .; end = .; }} > RAM
  .harness_io (NOLOAD) : {{ *(.harness_io*) }} > HARNESS
  ASSERT(_ebss + {self.stack_bytes} <= _estack, "SRAM overflow: arena + data + stack do not fit the board")
}}
"""


BOARDS: dict[str, Board] = {
    b.name: b
    for b in (
        # STM32F746 (Cortex-M7, single-precision FPv5): 320 KB SRAM, 1 MB flash, 216 MHz.
        Board("stm32f746", "cortex-m7", "fpv5-sp-d16", 320 * 1024, 1024 * 1024, 216_000_000, "mps2-an500"),
        # STM32H743 (Cortex-M7, double-precision FPv5): 512 KB AXI SRAM, 2 MB flash, 480 MHz.
        Board("stm32h743", "cortex-m7", "fpv5-d16", 512 * 1024, 2 * 1024 * 1024, 480_000_000, "mps2-an500"),
        # STM32L4R5 (Cortex-M4F, the MLPerf Tiny reference board): 640 KB SRAM, 2 MB flash, 120 MHz.
        Board("stm32l4r5", "cortex-m4", "fpv4-sp-d16", 640 * 1024, 2 * 1024 * 1024, 120_000_000, "mps2-an386"),
        # STM32F446 (Cortex-M4F): 128 KB SRAM, 512 KB flash, 180 MHz: a small budget.
        Board("stm32f446", "cortex-m4", "fpv4-sp-d16", 128 * 1024, 512 * 1024, 180_000_000, "mps2-an386"),
    )
}


def board(name: str) -> Board:
    if name not in BOARDS:
        raise ValueError(f"unknown board {name!r}; choose one of {', '.join(BOARDS)}")
    return BOARDS[name]
