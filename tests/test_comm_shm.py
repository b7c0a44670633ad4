"""Two processes, one shared buffer: a kernel in each spins on a flag the other one writes."""
import multiprocessing as mp

import numpy as np
import pytest
import torch

from fastmoe_ops import sim
from fastmoe_ops.comm import shm

pytestmark = pytest.mark.skipif(not sim.available(), reason="simulator extension or host compiler missing")

PINGPONG = r'''
// flag/data live in a buffer shared by two processes; `me` says which side runs here.
extern "C" __global__ void pingpong(int* flag, int* data, int me) {
  if (threadIdx.x != 0) return;
  if (me == 0) {                    // producer: publish, then wait for the answer
    data[0] = 41;
    __threadfence_system();
    atomicExch_system(flag, 1);
    while (atomicAdd_system(flag, 0) != 2) __nanosleep(1000);
  } else {                          // consumer: wait for the value, answer with value + 1
    while (atomicAdd_system(flag, 0) != 1) __nanosleep(1000);
    data[1] = data[0] + 1;
    __threadfence_system();
    atomicExch_system(flag, 2);
  }
}
'''


def _consumer(handle, queue):
    try:
        buf = shm.open(handle)
        ints = buf.view(torch.int32)
        f = sim.RawModule(code=PINGPONG).get_function("pingpong")
        f((1,), (32,), (ints[0:1], ints[1:3], np.int32(1)))
        queue.put(("ok", int(ints[2])))
        shm.close(buf)
    except Exception as e:  # report to the parent instead of dying silently
        queue.put(("error", repr(e)))


def test_cross_process_flag():
    f = sim.RawModule(code=PINGPONG).get_function("pingpong")  # compile once; the child hits the cache
    handle, buf = shm.create(64)
    ints = buf.view(torch.int32)
    ints.fill_(0)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_consumer, args=(handle, queue))
    child.start()
    try:
        # the consumer's kernel may start before or after ours: either way both finish
        f((1,), (32,), (ints[0:1], ints[1:3], np.int32(0)))
        status, value = queue.get(timeout=60)
        assert status == "ok", value
        assert value == 42 and int(ints[2]) == 42 and int(ints[0]) == 2
    finally:
        child.join(timeout=30)
        if child.is_alive():
            child.kill()
        shm.close(buf)
    assert child.exitcode == 0
