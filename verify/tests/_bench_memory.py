"""Peak GPU memory of each phase of the sm90 benches, computed on the CPU from the shapes (issue 25 item 4).

Every bench that holds large weights runs in phases (ours, then the torch bf16 baseline after ours is
freed, never both), and each phase's peak is planned here, itemized, as an UPPER bound: every tensor a
phase allocates is counted as live at once (no reuse inside a call), the weight preparation counts the raw
stacks, the prepared copies and one more prepared-size temporary, and a slack of 5 % + 1 GiB covers kernel
scratch (split-K partials, the allocator's rounding). The CPU test (test_bench_memory_plan.py) asserts every
phase stays under 70 GiB at V4-Pro sizes, so the benches fit an 80 GB H100 with the default allocator; on the
GPU each bench compares torch.cuda.max_memory_allocated() of each phase with its plan and fails (after
writing its table) when the plan was not an upper bound.

Sizes follow the benches: NVFP4 expert weights are packed E2M1 [E, N, K/2] + E4M3 scales [E, N, K/16]
(+ one float32 per expert), bf16 weights 2 bytes a value, activations of R = T * top_k expert rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GiB = 2**30
FIT_BYTES_H100 = 70 * GiB  # an 80 GB H100 has ~79.1 GiB; 9 GiB left for the context, cuBLAS workspaces, graphs
_SLACK_FRACTION, _SLACK_BYTES = 0.05, GiB


@dataclass
class PhasePlan:
    """One phase's planned live bytes: `items` name -> bytes; `peak` adds the slack."""

    name: str
    items: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, nbytes: int) -> None:
        self.items[name] = self.items.get(name, 0) + int(nbytes)

    @property
    def live(self) -> int:
        return sum(self.items.values())

    @property
    def peak(self) -> int:
        return int(self.live * (1 + _SLACK_FRACTION)) + _SLACK_BYTES

    def describe(self) -> str:
        top = sorted(self.items.items(), key=lambda kv: -kv[1])
        return (f"{self.name}: plan {self.peak / GiB:.1f} GiB (live {self.live / GiB:.1f} GiB: "
                + ", ".join(f"{k} {v / GiB:.2f}" for k, v in top) + ")")


def _sf_rows(rows: int, num_experts: int) -> int:
    """kernels.sm90.grouped_gemm_nvfp4.grouped_sf_rows (restated: this module must not import kernels)."""
    return (rows + 127 * min(num_experts, rows) + 127) // 128 * 128


_PLANES = "large-token path: fp16 activation planes (L1 + L2)"


def nvfp4_stack_bytes(e: int, n: int, k: int) -> int:
    return e * n * (k // 2 + k // 16) + 8 * e


def moe_plans(e: int, top_k: int, h: int, i: int, tokens: tuple[int, ...]) -> dict[str, PhasePlan]:
    """Planned peaks of the phases of verify/tests/test_sm90_moe_bench.py (each test's phases in order:
    copy bandwidth; grouped GEMMs ours / torch; whole block ours / torch; breakdown (ours); tile sweep)."""
    w13, w2 = nvfp4_stack_bytes(e, 2 * i, h), nvfp4_stack_bytes(e, h, i)
    w13_bf16, w2_bf16 = e * 2 * i * h * 2, e * h * i * 2
    t_max = max(tokens)
    r = t_max * top_k
    sf_h, sf_i = _sf_rows(r, e) * (h // 16), _sf_rows(r, e) * (i // 16)
    route = t_max * e * 4 * 3 + r * 8 * 8 + (e + 1) * 4 * 4  # rand / logits, ids, offsets, counts
    # the grouped GEMMs' large-token path: the activations decoded once into fp16 planes (L1: [R, H], L2: [R, I];
    # rows rounded up to 16, K to 128), both live inside one captured L1 + L2 call
    planes = (r + 15) // 16 * 16 * 2 * (-(-h // 128) * 128 + -(-i // 128) * 128)

    plans = {}
    p = plans["copy"] = PhasePlan("copy bandwidth")
    p.add("src + dst", 2 * GiB)

    # grouped GEMMs, ours: preparation (raw w1, w3 + prepared w13 + one temporary; raw w2 + its prepared
    # scales), then per T the operands and every output of one timed call (unfused gate/up float32 included)
    p = plans["grouped_ours"] = PhasePlan("grouped GEMMs, ours")
    p.add("weights w13 + w2 (prepared)", w13 + w2)
    p.add("preparation copies (raw w1 + w3, one temporary)", 2 * w13)
    p.add("routing", route)
    p.add("activations a + sf", r * h // 2 + sf_h)
    p.add("L1 out h + sf (x2: timed + reference)", 2 * (r * i // 2 + sf_i))
    p.add("unfused gate/up float32 + requant", 2 * r * i * 4 + r * i // 2 + sf_i)
    p.add("L2 out bf16", r * h * 2)
    p.add(_PLANES, planes)

    p = plans["grouped_torch"] = PhasePlan("grouped GEMMs, torch bf16")
    p.add("weights w13 + w2 bf16", w13_bf16 + w2_bf16)
    p.add("routing", route)
    p.add("x bf16", r * h * 2)
    p.add("y1, silu, h, y2", r * 2 * i * 2 + 2 * r * i * 2 + r * h * 2)

    # whole block, ours: preparation from three raw stacks, then per T one call of the unfused (dynamic)
    # path, the larger: x, router, dispatch, act quant, gate/up float32, requant, L2 out, combine
    p = plans["block_ours"] = PhasePlan("MoE block, ours")
    p.add("experts w13 + w2 (prepared)", w13 + w2)
    p.add("preparation copies (raw w1, w3, w2, one temporary)", 2 * w13 + w2)
    p.add("router gate + bias", e * h * 2 + e * 4)
    p.add("x + routing + dispatch", t_max * h * 2 + route + r * 8 * 6)
    p.add("act quant a + sf", r * h // 2 + sf_h)
    p.add("gate/up float32 + requant h + sf", 2 * r * i * 4 + r * i // 2 + sf_i)
    p.add("L2 out bf16 + combine out", r * h * 2 + t_max * h * 2)
    p.add(_PLANES, planes)

    # whole block, torch: bf16 weights, then either the GEMMs alone (xr and its outputs) or the block
    # (logits, top-k, sort, gather xs, y1, silu, h, y2, scatter y, bf16 weighted combine), whichever larger
    p = plans["block_torch"] = PhasePlan("MoE block, torch bf16")
    p.add("weights w13 + w2 bf16", w13_bf16 + w2_bf16)
    p.add("router gate + bias", e * h * 2 + e * 4)
    p.add("x + routing", t_max * h * 2 + route)
    gemms = r * h * 2 + r * 2 * i * 2 + 2 * r * i * 2 + r * h * 2
    block = (t_max * h * 4 + t_max * e * 4 * 4 + r * 8 * 4 + r * h * 2 + r * 2 * i * 2 + 2 * r * i * 2
             + 2 * r * h * 2 + t_max * top_k * 2 + t_max * h * 2)  # x.float(), logits/scores, ids, xs, y1, .., out
    p.add("one torch call (GEMMs alone or block)", max(gemms, block))

    p = plans["breakdown"] = PhasePlan("MoE block breakdown (ours)")
    p.items = dict(plans["block_ours"].items)
    p.add("step outputs kept (a, h, y) beside the timed call", r * h // 2 + sf_h + r * i // 2 + sf_i + r * h * 2)

    p = plans["tile_sweep"] = PhasePlan("fused L1 tile sweep")
    p.add("w13 (prepared)", w13)
    p.add("preparation copies (raw w1 + w3, one temporary)", 2 * w13)
    p.add("routing", route)
    p.add("activations + L1 out", r * h // 2 + sf_h + 2 * (r * i // 2 + sf_i))
    p.add(_PLANES, planes)
    return plans


def dense_plan(m: int, n: int, k: int, copies: int, bf16_copies: int) -> PhasePlan:
    """The NVFP4 dense GEMM bench (test_sm90_bench.py): its rotated weights, then (freed) the bf16 ones."""
    p = PhasePlan(f"dense gemm M={m} N={n} K={k}")
    w = n * k // 2 + (n + 127) // 128 * 128 * ((k // 16 + 3) // 4 * 4)
    p.add("weights (larger phase: ours rotated / bf16 rotated)", max(copies * w, bf16_copies * n * k * 2))
    p.add("activations + outputs", m * k * 2 * 2 + m * n * 2 * 4)
    return p


def fp8_plan(m: int, n: int, k: int, copies: int, bf16_copies: int) -> PhasePlan:
    """The FP8 block-scaled GEMM bench / sweep (test_sm90_fp8_gemm.py, test_sm90_fp8_sweep.py): rotated
    E4M3 weights, the bf16 weights, cuBLASLt's, the activations and every output (split-K partials float32)."""
    p = PhasePlan(f"fp8 gemm M={m} N={n} K={k}")
    g = -(-k // 128)
    p.add("weights e4m3 (rotated) + scales", copies * n * k + (-(-n // 128)) * g * 4)
    p.add("weights bf16 (rotated) + reference decode float64", (bf16_copies + 1) * n * k * 2 + n * k * 8)
    p.add("activations (codes, scales, bf16, float64 decode)", m * k * (1 + 2 + 8) + m * g * 4)
    p.add("outputs (bf16 x calls, split-K partials float32)", m * n * 2 * 16 + g * m * n * 4)
    return p
