// x86-64 System V fiber context switch for the SIMT simulator.
//
//   void fmo_sim_switch(void** save_sp, void* load_sp);
// Saves the callee-saved registers, MXCSR and the x87 control word on the current stack,
// stores the stack pointer to *save_sp, loads load_sp and restores the other context. No
// system call (ucontext's swapcontext makes one for the signal mask: ~1 us instead of ~10 ns).
//
//   fmo_sim_fiber_start: first "return address" of a new fiber; calls r13(r12).
//
// Top-level asm in a .cpp file: setuptools' compiler does not accept .S sources.

asm(
    "    .text\n"
    "    .globl fmo_sim_switch\n"
    "    .hidden fmo_sim_switch\n"
    "    .type fmo_sim_switch, @function\n"
    "fmo_sim_switch:\n"
    "    .cfi_startproc\n"
    "    pushq %rbp\n"
    "    pushq %rbx\n"
    "    pushq %r12\n"
    "    pushq %r13\n"
    "    pushq %r14\n"
    "    pushq %r15\n"
    "    subq $8, %rsp\n"
    "    stmxcsr (%rsp)\n"
    "    fnstcw 4(%rsp)\n"
    "    movq %rsp, (%rdi)\n"
    "    movq %rsi, %rsp\n"
    "    ldmxcsr (%rsp)\n"
    "    fldcw 4(%rsp)\n"
    "    addq $8, %rsp\n"
    "    popq %r15\n"
    "    popq %r14\n"
    "    popq %r13\n"
    "    popq %r12\n"
    "    popq %rbx\n"
    "    popq %rbp\n"
    "    ret\n"
    "    .cfi_endproc\n"
    "    .size fmo_sim_switch, .-fmo_sim_switch\n"
    "\n"
    "    .globl fmo_sim_fiber_start\n"
    "    .hidden fmo_sim_fiber_start\n"
    "    .type fmo_sim_fiber_start, @function\n"
    "fmo_sim_fiber_start:\n"
    "    .cfi_startproc\n"
    "    .cfi_undefined rip\n"
    "    movq %r12, %rdi\n"
    "    callq *%r13\n"
    "    ud2\n"
    "    .cfi_endproc\n"
    "    .size fmo_sim_fiber_start, .-fmo_sim_fiber_start\n"
    "\n"
    "    .section .note.GNU-stack,\"\",@progbits\n"
);
