/* Cortex-M startup for the board linker scripts (mcu/boards.py): vector table, .data/.bss
 * set-up, FPU enable, main(); faults report over semihosting and exit with code 70. */
#include <stdint.h>

extern uint32_t _sidata, _sdata, _edata, _sbss, _ebss, _estack;
extern int main(void);
extern void tp_exit(int32_t code);

static void write0(const char *s) {
  register int32_t r0 __asm__("r0") = 0x04; /* SYS_WRITE0 */
  register const char *r1 __asm__("r1") = s;
  __asm__ volatile("bkpt 0xAB" : "+r"(r0) : "r"(r1) : "memory");
}

void Reset_Handler(void) {
#if defined(__ARM_FP)
  *(volatile uint32_t *)0xE000ED88u |= 0xFu << 20; /* CPACR: full access to CP10/CP11 */
  __asm__ volatile("dsb\n isb" ::: "memory");
#endif
  for (uint32_t *src = &_sidata, *dst = &_sdata; dst < &_edata;) *dst++ = *src++;
  for (uint32_t *dst = &_sbss; dst < &_ebss;) *dst++ = 0;
  tp_exit(main());
}

void Fault_Handler(void) {
  write0("FAULT: the program took a HardFault/MemManage/BusFault/UsageFault\n");
  tp_exit(70);
}

__attribute__((section(".isr_vector"), used)) static void (*const vectors[16])(void) = {
    (void (*)(void))(&_estack), Reset_Handler, Fault_Handler, Fault_Handler, Fault_Handler, Fault_Handler,
    Fault_Handler, 0, 0, 0, 0, Fault_Handler, Fault_Handler, 0, Fault_Handler, Fault_Handler,
};
