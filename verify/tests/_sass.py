"""Shared helpers of the sm_90a compile tests: Triton's bundled cuobjdump (SASS, resource usage) and ptxas
(its -v log, where the wgmma serialization warnings C7510-C7520 appear)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest


def _tool(name: str) -> Path:
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not tool.exists():
        pytest.skip(f"triton: no bundled {name} at {tool}")
    return tool


def _cuobjdump(cubin: bytes, tmp_path: Path, *flags: str) -> str:
    """cuobjdump's output for `cubin` with `flags` (-sass, -res-usage)."""
    path = tmp_path / "kernel.cubin"
    path.write_bytes(cubin)
    return subprocess.run([str(_tool("cuobjdump")), *flags, str(path)], check=True, capture_output=True,
                          text=True).stdout


def registers_without_spills(cubin: bytes, tmp_path: Path, what: str) -> int:
    """The kernel's registers a thread (cuobjdump -res-usage); fails the test, naming `what`, where it spills (stack
    or local memory)."""
    usage = _cuobjdump(cubin, tmp_path, "-res-usage")
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage)
    assert found, usage
    regs, stack, local = map(int, found.groups())
    assert stack == 0 and local == 0, f"{what}: spills (STACK {stack}, LOCAL {local}, {regs} registers)"
    return regs


def ptxas_log(ptx: str, tmp_path: Path, arch: str = "sm_90a") -> str:
    """ptxas -v's log for `ptx` (the same assembler Triton ran): its warnings, registers, spills."""
    src, out = tmp_path / "kernel.ptx", tmp_path / "kernel_ptxas.cubin"
    src.write_text(ptx)
    proc = subprocess.run([str(_tool("ptxas")), "-v", f"--gpu-name={arch}", str(src), "-o", str(out)],
                          check=True, capture_output=True, text=True)
    return proc.stdout + proc.stderr


def wgmma_serialization_warnings(log: str) -> list[str]:
    """The ptxas warnings that say wgmma no longer overlaps (C7514 serialized, C7517 wait injected, C7513 / C7515
    / C7516 / C7518 / C7519 / C7520 their causes): the lines that name them."""
    return [line for line in log.splitlines() if re.search(r"\bC75(?:1\d|20)\b", line)]


def wgmma_depbars(sass: str) -> list[int]:
    """The in-flight counts N of every `WARPGROUP.DEPBAR.LE gsb0, N` in SASS order (0: a full wait)."""
    return [int(n, 16) for n in re.findall(r"WARPGROUP\.DEPBAR\.LE\s+gsb0,\s*(0x[0-9a-f]+)", sass)]


# ---- control flow of cuobjdump -sass text: where local memory is touched relative to loops ----------------------

_INSN = re.compile(r"/\*([0-9a-f]+)\*/\s+(.*?)\s*;")
_GUARD = re.compile(r"^@!?U?P[0-9]+\s+")  # a guard predicate (@PT: always, so not a guard)
_LOCAL = re.compile(r"^(?:@!?U?PT?[0-9]*\s+)?(?:STL|LDL)\b")


def _functions(sass: str) -> list[list[tuple[int, str]]]:
    """Each `Function :` section of cuobjdump -sass as [(address, instruction text)] in address order."""
    sections = re.split(r"^\s*Function\s*:.*$", sass, flags=re.MULTILINE)[1:] or [sass]
    return [[(int(a, 16), text) for a, text in _INSN.findall(section)] for section in sections]


def _loop_instructions(insns: list[tuple[int, str]]) -> set[int]:
    """Indices into `insns` of the instructions inside a loop of one function's control-flow graph: the basic blocks
    of a strongly connected component with a cycle (a loop body, the out-of-line blocks it jumps to and returns
    from, such as an mbarrier try-wait spin), plus every block a call inside a loop can reach before its RET
    (a subroutine called from a loop runs in it)."""
    index = {addr: i for i, (addr, _) in enumerate(insns)}
    starts = {0}
    succ_of: dict[int, list[int]] = {}  # instruction index -> successor instruction indices (at block ends only)
    calls: dict[int, int] = {}  # instruction index of a CALL -> index of its target
    for i, (_, text) in enumerate(insns):
        body = re.sub(r"^@!?U?PT?[0-9]*\s+", "", text)
        op = body.split()[0]
        guarded = bool(_GUARD.match(text))
        after = [i + 1] if i + 1 < len(insns) else []
        if op.startswith(("BRX", "JMX", "JMP", "BRXU")):
            raise ValueError(f"SASS: an indirect or absolute jump ({text}) is not handled")
        if op.startswith("BRA"):  # BRA.DIV, BRA.U, a predicate operand: conditional (a fall-through edge too)
            target = index[int(re.findall(r"0x[0-9a-f]+", body)[-1], 16)]
            plain = op == "BRA" and not guarded and not re.match(r"BRA\s+!?U?P", body)
            succ_of[i] = [target] + ([] if plain else after)
            starts.update({target, i + 1})
        elif op.startswith("CALL"):  # control comes back after it (the callee: see calls)
            calls[i] = index[int(re.findall(r"0x[0-9a-f]+", body)[-1], 16)]
            starts.update({calls[i], i + 1})
        elif op.startswith(("EXIT", "RET")):
            succ_of[i] = after if guarded else []
            starts.add(i + 1)
    starts = sorted(s for s in starts if s < len(insns))
    block_of = {}
    blocks = []  # (first, last) instruction index
    for b, first in enumerate(starts):
        last = (starts[b + 1] if b + 1 < len(starts) else len(insns)) - 1
        blocks.append((first, last))
        block_of.update({i: b for i in range(first, last + 1)})
    edges = [[block_of[s] for s in succ_of.get(last, [last + 1] if last + 1 < len(insns) else [])]
             for first, last in blocks]
    # Tarjan's strongly connected components, iteratively
    order, low, on_stack, stack, in_loop, counter = {}, {}, set(), [], set(), [0]
    for root in range(len(blocks)):
        if root in order:
            continue
        work = [(root, 0)]
        while work:
            v, k = work.pop()
            if k == 0:
                order[v] = low[v] = counter[0]
                counter[0] += 1
                stack.append(v)
                on_stack.add(v)
            if k < len(edges[v]):
                work.append((v, k + 1))
                w = edges[v][k]
                if w not in order:
                    work.append((w, 0))
                elif w in on_stack:
                    low[v] = min(low[v], order[w])
                continue
            if low[v] == order[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1 or v in edges[v]:
                    in_loop.update(comp)
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[v])
    grown = True
    while grown:  # subroutines called from inside a loop
        grown = False
        for site, target in calls.items():
            if block_of[site] in in_loop and block_of[target] not in in_loop:
                todo = [block_of[target]]
                while todo:
                    b = todo.pop()
                    if b not in in_loop:
                        in_loop.add(b)
                        grown = True
                        todo.extend(edges[b])
    return {i for b in in_loop for i in range(blocks[b][0], blocks[b][1] + 1)}


def instructions_in_loops(sass: str) -> list[str]:
    """The instructions inside a loop of the SASS's control flow (see _loop_instructions), as `address: instruction`
    lines in address order."""
    lines = []
    for insns in _functions(sass):
        inside = _loop_instructions(insns)
        lines += [f"{addr:#x}: {text}" for i, (addr, text) in enumerate(insns) if i in inside]
    return lines


def local_memory_in_loops(sass: str) -> list[str]:
    """The local-memory instructions (STL / LDL: spill stores and reloads) inside a loop of the SASS's control flow,
    as `address: instruction` lines; empty where every one runs outside the loops (a register value parked on the
    stack across a loop costs one store and one load a thread, not one a K tile)."""
    return [line for line in instructions_in_loops(sass) if _LOCAL.match(line.split(": ", 1)[1])]


def local_memory_instructions(sass: str) -> list[str]:
    """Every STL / LDL of the SASS as `address: instruction` lines."""
    return [f"{addr:#x}: {text}" for insns in _functions(sass) for addr, text in insns if _LOCAL.match(text)]


def resource_usage(cubin: bytes, tmp_path: Path) -> dict[str, int]:
    """cuobjdump -res-usage's REG, STACK, SHARED and LOCAL of the kernel."""
    usage = _cuobjdump(cubin, tmp_path, "-res-usage")
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    assert found, usage
    return dict(zip(("REG", "STACK", "SHARED", "LOCAL"), map(int, found.groups())))
