"""An outside backend for nvfp4-verify in a few dozen lines: an engine's MoE routing written in torch.

It serves router, dispatch and combine; every other op is "not served" with its own sentence. Installed,
it registers itself under the entry-point group `nvfp4_verify.backends` (pyproject.toml), so
`python -m verify layer --backend example-routing` and `python -m verify selftest --backend example-routing`
judge it; without installing, `--backend nvfp4_verify_example:ExampleRouting` does the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from verify.backends import Backend, Dispatched, Op, RoutingOut

__version__ = "0.1.0"
_NO_GEMM = "not served: example-routing computes no GEMM and no quantization (it is an engine's routing only)"


class ExampleRouting(Backend):
    name = "example-routing"
    u_acc = 2.0**-24                 # combine sums in float32
    accumulator = "float32 (combine: k rows per token in slot order)"
    not_served = {op: _NO_GEMM for op in Op if op not in (Op.ROUTER, Op.DISPATCH, Op.COMBINE, Op.PREPARE)}

    def prepare_router(self, router, spec):
        return router, spec          # the checkpoint tensors as they are: nothing to repack

    def router(self, x_bf16, router, *, token_ids_i64=None):
        r, spec = router
        s = x_bf16.float() @ r.gate_weight_bf16.float().t()
        s = torch.sqrt(F.softplus(s)) if spec.scoring == "sqrtsoftplus" else torch.sigmoid(s)
        if r.tid2eid_i64 is not None:                       # hash-routed layers
            ids = r.tid2eid_i64[token_ids_i64]
        else:                                               # ties go to the lower id (a stable sort)
            biased = s if r.gate_bias_f32 is None else s + r.gate_bias_f32
            ids = torch.sort(biased, dim=-1, descending=True, stable=True).indices[:, :spec.top_k]
        w = s.gather(1, ids)
        return RoutingOut(ids, w / w.sum(-1, keepdim=True) * spec.routed_scaling_factor)

    def dispatch(self, ids_i64, num_experts):
        k = ids_i64.shape[1]
        order = torch.argsort(ids_i64.reshape(-1), stable=True)
        counts = torch.zeros(num_experts, dtype=torch.int64, device=ids_i64.device)
        counts.scatter_add_(0, ids_i64.reshape(-1), torch.ones_like(order))
        offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
        return Dispatched(order // k, order % k, offsets, k)

    def combine(self, y_rows_bf16, d, weights_f32):
        k = d.top_k if weights_f32 is None else weights_f32.shape[1]
        rows = torch.empty_like(y_rows_bf16, dtype=torch.float32)
        rows[d.row_token_i64 * k + d.row_slot_i64] = y_rows_bf16.float()   # back to (token, slot) order
        rows = rows.view(-1, k, rows.shape[-1])
        if weights_f32 is not None:
            rows = rows * weights_f32.unsqueeze(-1)
        return rows.sum(1).to(torch.bfloat16)
