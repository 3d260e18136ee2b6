"""ResidualAttention kernels vs SGLang 0.5.17's triton attention over materialised per-adapter KV (issue 8).

Shapes: Llama-3.1-8B (H_q 32, H_kv 8, D 128, neox RoPE theta 5e5), bf16, adapters of rank 16 (R_MAX 16), scattered
slots. Decode: contexts 4K and 32K, batch 1/4/16/64; ours with K+V LoRA and with V-only LoRA (b_k None: the K
reconstruction is compiled out) vs SGLang's decode_attention_fwd reading a fully materialised KV of the same length
(8 KV splits, its default, and our adaptive split count). Extend: 512 new tokens over a 4K / 32K prefix, batch 1/4,
vs SGLang's extend_attention_fwd (prefix from the pool, new tokens from contiguous k/v).

Timing: each op captured in a CUDA graph; per replay the L2 is flushed (256 MB memset), then CUDA events around
the replay; median of the replays. Bandwidth = bytes that must be read / time; floor = those bytes / measured copy
bandwidth (a 4 GiB device-to-device copy, bytes read + written; a read-only sum is reported beside it, since a
decode only reads and can beat a copy). Before timing, bf16 results at full shapes are checked against the float64
reference (rel_err = max|o - ref| / max|ref| < 1e-2).

Decode "K+V" passes the RoPE table in the pool dtype (bf16), as the serving backend should; "K+V fp32 rope" passes
SGLang's float32 table. Extend configurations are first checked one per process (a miscompiled configuration can
fault the CUDA context), and only those that pass are timed.

GPU (SGLang's two kernel files and their few imports copied under .gpu_sgl/, never committed):
    export PYTHONPATH=.gpu_sgl
    python3 bench/kernels.py --list-extend-configs | xargs -P 12 -L 1 sh -c \
        'python3 bench/kernels.py --check-extend $0 $1 $2 $3 $4 || echo "BAD $0 $1 $2 $3 $4 crashed"' > ext_ok.txt
    python3 bench/kernels.py --out $OUT/kernels.md --extend-ok ext_ok.txt
CPU smoke test of this script (interpreter, tiny fp32 shapes, no timing worth reading):
    TRITON_INTERPRET=1 python bench/kernels.py --smoke
"""

import argparse
import os
import statistics
import sys
import time

import torch

# this file is itself named kernels.py: put the repo root (holding the kernels/ package) in place of bench/
_BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path = [os.path.dirname(_BENCH_DIR)] + [p for p in sys.path if os.path.abspath(p or ".") != _BENCH_DIR]
try:
    from sglang_forkkv.kernels.residual_attention_ref import (
        reconstruct_kv_ref, residual_decode_ref, residual_extend_ref)
    from sglang_forkkv.kernels.residual_decode import choose_num_kv_splits, residual_decode
    from sglang_forkkv.kernels.residual_extend import residual_extend
except ImportError:
    from kernels.residual_attention_ref import reconstruct_kv_ref, residual_decode_ref, residual_extend_ref
    from kernels.residual_decode import choose_num_kv_splits, residual_decode
    from kernels.residual_extend import residual_extend
from sglang.kernels.ops.attention.decode_attention import decode_attention_fwd
from sglang.kernels.ops.attention.extend_attention import extend_attention_fwd

MAX_SPLITS = 64  # scratch depth for our adaptive splits
SGL_SPLITS = 8  # SGLang's default --triton-attention-num-kv-splits
VARIANTS = ("K+V", "K+V fp32 rope", "V-only")
# extend (block_m, block_n, num_warps, num_stages) candidates, each checked alone first (--check-extend)
EXTEND_CONFIGS = [(128, 32, 8, 2), (128, 32, 8, 3), (64, 32, 4, 2), (64, 32, 4, 3), (64, 16, 4, 2), (128, 16, 8, 3)]


class Setup:
    """One set of pools shared by every configuration: base KV, materialised KV for SGLang, residuals, adapters."""

    def __init__(self, h_q, h_kv, d, rank, num_adapters, num_slots, max_pos, dtype, device):
        self.h_q, self.h_kv, self.d, self.rank, self.dtype, self.device = h_q, h_kv, d, rank, dtype, device
        g = torch.Generator(device=device).manual_seed(0)

        def randn(*shape, scale=1.0):
            return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * scale).to(dtype)

        self.num_slots = num_slots
        self.k_buffer, self.v_buffer = randn(num_slots, h_kv, d), randn(num_slots, h_kv, d)
        self.k_mat, self.v_mat = randn(num_slots, h_kv, d), randn(num_slots, h_kv, d)  # SGLang's per-adapter copy
        self.r_buffer = randn(num_slots, 2 * rank)
        q_size, kv_size = h_q * d, h_kv * d
        b_qkv = randn(num_adapters, q_size + 2 * kv_size, rank, scale=0.3)  # SGLang's qkv LoRA B buffer layout
        self.b_k, self.b_v = b_qkv[:, q_size : q_size + kv_size], b_qkv[:, q_size + kv_size :]
        self.scaling = torch.full((num_adapters,), 2.0, device=device)
        inv_freq = 1.0 / (500000.0 ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
        angles = torch.outer(torch.arange(max_pos, device=device, dtype=torch.float32), inv_freq)
        self.cos_sin_cache = torch.cat((angles.cos(), angles.sin()), dim=-1)
        # the same table in the pool dtype: half the bytes per K tile (what the serving backend is advised to pass)
        self.cos_sin_half = self.cos_sin_cache.to(dtype)
        self.num_adapters = num_adapters
        self.gen = g

    def tables(self, seq_lens, lora_slot):
        """Scattered base and residual slots for requests of these lengths.

        Slot 0 may be used here: 64 x 32K tokens need every one of the 2^21 slots, and one more would push SGLang's
        int32 offset arithmetic (slot * 1024 elements) past 2^31.
        """
        batch, max_ctx = len(seq_lens), max(seq_lens) + 8
        total = sum(seq_lens)
        slots = torch.randperm(self.num_slots, generator=self.gen, device=self.device)[:total]
        res = torch.randperm(self.num_slots, generator=self.gen, device=self.device)[:total]
        req_to_token = torch.zeros(batch, max_ctx, dtype=torch.int32, device=self.device)
        req_to_residual = torch.zeros(batch, max_ctx, dtype=torch.int32, device=self.device)
        off = 0
        for i, n in enumerate(seq_lens):
            req_to_token[i, :n] = slots[off : off + n].int()
            req_to_residual[i, :n] = res[off : off + n].int()
            off += n
        i32 = dict(dtype=torch.int32, device=self.device)
        return dict(
            req_to_token=req_to_token, req_to_residual=req_to_residual,
            req_pool_indices=torch.arange(batch, **i32), seq_lens=torch.tensor(seq_lens, **i32),
            lora_slot=torch.tensor(lora_slot, **i32),
        )

    def args(self, tables, k_lora=True):
        return dict(
            k_buffer=self.k_buffer, v_buffer=self.v_buffer, r_buffer=self.r_buffer, **tables,
            b_k=self.b_k if k_lora else None, b_v=self.b_v, scaling=self.scaling,
            cos_sin_cache=self.cos_sin_cache, is_neox=True, sm_scale=self.d**-0.5,
        )

    def materialise(self, tables, prefix_lens=None):
        """Write each request's reconstructed K/V into k_mat/v_mat at its slots (for SGLang's correctness check)."""
        for i in range(len(tables["seq_lens"])):
            n = int(tables["seq_lens"][i])
            k, v = reconstruct_kv_ref(
                self.k_buffer, self.v_buffer, self.r_buffer, tables["req_to_token"], tables["req_to_residual"], i, n,
                int(tables["lora_slot"][i]), self.b_k, self.b_v, self.scaling, self.cos_sin_cache, True,
                dtype=torch.float32)
            slots = tables["req_to_token"][i, :n].long()
            self.k_mat[slots], self.v_mat[slots] = k.to(self.dtype), v.to(self.dtype)


def sglang_kv_index(tables, lens):
    """kv_indptr / kv_indices over the first lens[i] slots of each request (SGLang's flattened page table)."""
    dev = tables["req_to_token"].device
    indptr = torch.zeros(len(lens) + 1, dtype=torch.int32, device=dev)
    indptr[1:] = torch.tensor(lens, device=dev).cumsum(0)
    indices = torch.cat([tables["req_to_token"][i, :n] for i, n in enumerate(lens)]) if sum(lens) else \
        torch.zeros(1, dtype=torch.int32, device=dev)
    return indptr, indices


def rel_err(out, ref):
    return ((out.double() - ref).abs().max() / ref.abs().max()).item()


class Timer:
    """Median time (us) of a CUDA-graph replay with the L2 flushed before each replay; wall clock on the CPU."""

    def __init__(self, device, reps):
        self.device, self.reps = device, reps
        self.flush = torch.empty(256 << 20, dtype=torch.int8, device=device) if device == "cuda" else None

    def __call__(self, fn):
        if self.device != "cuda":
            fn()
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e6
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        for i in range(self.reps):
            self.flush.zero_()
            starts[i].record()
            graph.replay()
            ends[i].record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) * 1e3


def copy_bandwidth(device, nbytes, timer):
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    src = torch.randn(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    us = timer(lambda: dst.copy_(src))
    return 2 * nbytes / (us * 1e-6) / 1e9


def read_bandwidth(device, nbytes, timer):
    """Read-only bandwidth in GB/s: a sum over a large float32 tensor (decode only reads, so it can beat a copy)."""
    src = torch.randn(nbytes // 4, dtype=torch.float32, device=device)
    out = torch.empty((), device=device)
    us = timer(lambda: torch.sum(src, dim=0, out=out))
    return nbytes / (us * 1e-6) / 1e9


def decode_runner(s, tables, q, variant, splits, block_n=32, num_warps=4, num_stages=2):
    """variant: "K+V" (RoPE table in the pool dtype), "K+V fp32 rope" (float32 table), "V-only" (b_k None)."""
    batch = q.shape[0]
    o = torch.empty_like(q)
    logits = torch.empty(batch, s.h_q, MAX_SPLITS, s.d, device=q.device)
    lse = torch.empty(batch, s.h_q, MAX_SPLITS, device=q.device)
    args = s.args(tables, k_lora=variant != "V-only")
    if variant == "K+V":
        args["cos_sin_cache"] = s.cos_sin_half
    return o, lambda: residual_decode(q, **args, o=o, attn_logits=logits, attn_lse=lse, num_kv_splits=splits,
                                      block_n=block_n, num_warps=num_warps, num_stages=num_stages)


def sglang_decode_runner(s, tables, q, splits, max_splits):
    batch = q.shape[0]
    lens = [int(n) for n in tables["seq_lens"]]
    indptr, indices = sglang_kv_index(tables, lens)
    o = torch.empty_like(q)
    logits = torch.empty(batch, s.h_q, max_splits, s.d, device=q.device)
    lse = torch.empty(batch, s.h_q, max_splits, device=q.device)
    return o, lambda: decode_attention_fwd(q, s.k_mat, s.v_mat, o, indptr, indices, logits, lse, splits, max_splits,
                                           s.d**-0.5, 1.0, 1.0)


def extend_runner(s, tables, q, qo_indptr, max_ext, k_lora, **blocks):
    o = torch.empty_like(q)
    args = s.args(tables, k_lora)
    args["cos_sin_cache"] = s.cos_sin_half
    return o, lambda: residual_extend(q, **args, qo_indptr=qo_indptr, o=o, max_extend_len=max_ext, **blocks)


def sglang_extend_runner(s, tables, q, qo_indptr, prefix_lens, extend_lens):
    """SGLang's extend: prefix from the materialised pool, new tokens' K/V from contiguous tensors."""
    indptr, indices = sglang_kv_index(tables, prefix_lens)
    new = [tables["req_to_token"][i, p : p + e].long() for i, (p, e) in enumerate(zip(prefix_lens, extend_lens))]
    new = torch.cat(new)
    k_ext, v_ext = s.k_mat[new].contiguous(), s.v_mat[new].contiguous()
    o = torch.empty_like(q)
    return o, lambda: extend_attention_fwd(q, k_ext, v_ext, o, s.k_mat, s.v_mat, qo_indptr, indptr, indices, None,
                                           True, None, max(extend_lens), 1.0, 1.0, s.d**-0.5)


def check_decode(s, device, lines):
    """Decode at full shapes (bf16; fp32 on CPU) vs the float64 reference; SGLang on materialised KV as a control."""
    tol = 1e-2 if s.dtype != torch.float32 else 1e-3
    ok = True
    seq_lens, lora = s.check_decode_lens, [0, 1, -1, 3][: len(s.check_decode_lens)]
    tables = s.tables(seq_lens, lora)
    q = torch.randn(len(seq_lens), s.h_q, s.d, device=device).to(s.dtype)
    splits = choose_num_kv_splits(tables["seq_lens"], s.h_kv, MAX_SPLITS, s.num_sms)
    for variant in ("K+V", "K+V fp32 rope", "V-only"):
        for cfg in s.decode_check_cfgs:
            o, fn = decode_runner(s, tables, q, variant, splits, *cfg)
            fn()
            ref = residual_decode_ref(q, **s.args(tables, k_lora=variant != "V-only"))
            err = rel_err(o, ref)
            ok &= err < tol and not o.isnan().any()
            lines.append(f"decode {variant} {cfg} lens {seq_lens} lora {lora}: rel_err {err:.2e}")
    s.materialise(tables)
    o, fn = sglang_decode_runner(s, tables, q, torch.full((len(seq_lens),), SGL_SPLITS, dtype=torch.int32,
                                                          device=device), SGL_SPLITS)
    fn()
    err = rel_err(o, residual_decode_ref(q, **s.args(tables)))
    lines.append(f"decode SGLang on materialised KV: rel_err {err:.2e}")

    return ok


def check_extend(s, device, lines, blocks, k_lora):
    """Extend at full shapes vs the float64 reference (bf16 tolerance 1e-2), one variant and block configuration."""
    tol = 1e-2 if s.dtype != torch.float32 else 1e-3
    prefix, ext, lora = s.check_extend_prefix, s.check_extend_new, [1, -1]
    seq = [p + e for p, e in zip(prefix, ext)]
    tables = s.tables(seq, lora)
    q = torch.randn(sum(ext), s.h_q, s.d, device=device).to(s.dtype)
    qo = torch.tensor([0, ext[0], ext[0] + ext[1]], dtype=torch.int32, device=device)
    ref = residual_extend_ref(q, **s.args(tables, k_lora), qo_indptr=qo)
    o, fn = extend_runner(s, tables, q, qo, max(ext), k_lora, **blocks)
    fn()
    err = rel_err(o, ref)
    ok = err < tol and not o.isnan().any()
    lines.append(f"extend {'K+V' if k_lora else 'V-only'} {blocks} prefix {prefix} new {ext}: rel_err {err:.2e}")
    if k_lora and not s.sglang_extend_checked:
        s.materialise(tables)
        o, fn = sglang_extend_runner(s, tables, q, qo, prefix, ext)
        fn()
        lines.append(f"extend SGLang on materialised KV: rel_err {rel_err(o, ref):.2e}")
        s.sglang_extend_checked = True
    return ok


def isolated_extend_check(variant, cfg, device, smoke):
    """One extend configuration at Llama-8B shapes (bf16) against the float64 reference, in its own process."""
    h_q, h_kv, d, dtype = (4, 2, 64, torch.float32) if smoke else (32, 8, 128, torch.bfloat16)
    prefix, ext = ([30, 0, 9], [20, 9, 5]) if smoke else ([4096, 0, 571], [512, 300, 129])
    s = Setup(h_q, h_kv, d, 16, 4, 8192, 8192, dtype, device)
    tables = s.tables([p + e for p, e in zip(prefix, ext)], [1, -1, 0])
    q = torch.randn(sum(ext), h_q, d, device=device).to(dtype)
    qo = torch.tensor([0] + torch.tensor(ext).cumsum(0).tolist(), dtype=torch.int32, device=device)
    ref = residual_extend_ref(q, **s.args(tables, k_lora=variant == "kv"), qo_indptr=qo)
    blocks = dict(zip(("block_m", "block_n", "num_warps", "num_stages"), cfg))
    o, fn = extend_runner(s, tables, q, qo, max(ext), variant == "kv", **blocks)
    o.fill_(float("nan"))
    fn()
    err = rel_err(o, ref)
    good = err < (1e-2 if dtype != torch.float32 else 1e-3) and not o.isnan().any()
    print(f"{'OK' if good else 'BAD'} {variant} {' '.join(map(str, cfg))} rel_err {err:.2e}", flush=True)


def md_table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="tiny fp32 shapes (CPU interpreter)")
    parser.add_argument("--out", default="kernels_bench.md")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--extend-ok", help="file of 'OK kv|v BLOCK_M BLOCK_N WARPS STAGES' lines: the extend "
                        "configurations checked in separate processes (a miscompiled one can fault the context)")
    parser.add_argument("--list-extend-configs", action="store_true", help="print 'kv|v M N WARPS STAGES' lines")
    parser.add_argument("--check-extend", nargs=5, metavar=("VARIANT", "BLOCK_M", "BLOCK_N", "WARPS", "STAGES"),
                        help="check one extend configuration alone and print an 'OK ...' or 'BAD ...' line")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.list_extend_configs:
        print("\n".join(f"{v} {m} {n} {w} {st}" for v in ("kv", "v") for m, n, w, st in EXTEND_CONFIGS))
        return
    if args.check_extend:
        isolated_extend_check(args.check_extend[0], [int(x) for x in args.check_extend[1:]], device, args.smoke)
        return
    if args.smoke:
        h_q, h_kv, d, dtype = 4, 2, 64, torch.float32
        contexts, batches, ext_prefix, ext_batches, ext_new = [40], [1, 2], [50], [1], 20
        decode_sweep = [(16, 4, 2), (32, 4, 2)]
        extend_sweep = [dict(block_m=16, block_n=16, num_warps=4, num_stages=1)]
        pps_sweep = [4]
    else:
        h_q, h_kv, d, dtype = 32, 8, 128, torch.bfloat16
        contexts, batches, ext_prefix, ext_batches, ext_new = [4096, 32768], [1, 4, 16, 64], [4096, 32768], [1, 4], 512
        decode_sweep = [(16, 4, 3), (16, 4, 4), (32, 4, 2), (32, 4, 3), (32, 4, 4), (32, 8, 3)]
        extend_sweep = [dict(block_m=m, block_n=n, num_warps=w, num_stages=st)
                        for m, n, w, st in EXTEND_CONFIGS]
        pps_sweep = [2, 4, 8]
    rank = 16
    num_slots = max(max(contexts) * max(batches), 256)
    s = Setup(h_q, h_kv, d, rank, 4, num_slots, max(max(contexts), max(ext_prefix) + ext_new) + 16, dtype, device)
    s.num_sms = torch.cuda.get_device_properties(0).multi_processor_count if device == "cuda" else 8
    s.check_decode_lens = [32768, 4096, 1234, 1] if not args.smoke else [40, 17, 1, 33]
    s.decode_check_cfgs = [(16, 4, 2), (32, 4, 3)]
    s.sglang_extend_checked = False
    s.check_extend_prefix, s.check_extend_new = ([4096, 0], [512, 300]) if not args.smoke else ([30, 0], [20, 9])
    timer = Timer(device, args.reps)
    lines = []
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu (interpreter)"
    lines.append(f"device: {name}, {s.num_sms} SMs; torch {torch.__version__}")
    sections = []

    def report(final=False):
        text = "\n\n".join(["\n".join(f"- {line}" for line in lines)] + sections)
        with open(args.out, "w") as f:
            f.write(text + "\n")
        if final:
            print(text)

    ok = check_decode(s, device, lines)
    copy_bw = copy_bandwidth(device, (4 << 30) if not args.smoke else (1 << 20), timer)
    read_bw = read_bandwidth(device, (4 << 30) if not args.smoke else (1 << 20), timer)
    lines.append(f"copy bandwidth (read + write): {copy_bw:.0f} GB/s; read-only bandwidth (a sum): {read_bw:.0f} GB/s")
    print("\n".join(lines), flush=True)
    i32 = dict(dtype=torch.int32, device=device)

    def decode_setup(ctx, batch):
        tables = s.tables([ctx] * batch, [i % s.num_adapters for i in range(batch)])
        q = torch.randn(batch, h_q, d, device=device).to(dtype)
        return tables, q

    # decode sweeps at the largest context: (block_n, num_warps, num_stages) at batch 16, then programs per SM
    sweep_rows = []
    tables, q = decode_setup(max(contexts), min(16, max(batches)))
    splits = choose_num_kv_splits(tables["seq_lens"], h_kv, MAX_SPLITS, s.num_sms)
    best = {}
    for variant in VARIANTS:
        for cfg in decode_sweep:
            us = timer(decode_runner(s, tables, q, variant, splits, *cfg)[1])
            sweep_rows.append([f"decode {variant}", f"{max(contexts)}", f"{q.shape[0]}",
                               f"block_n {cfg[0]} warps {cfg[1]} stages {cfg[2]}", f"{us:.1f}"])
            if variant not in best or us < best[variant][1]:
                best[variant] = (cfg, us)
    pps_time = {}
    for batch in [b for b in batches if b <= 16]:
        tables, q = decode_setup(max(contexts), batch)
        for pps in pps_sweep:
            sp = choose_num_kv_splits(tables["seq_lens"], h_kv, MAX_SPLITS, s.num_sms, programs_per_sm=pps)
            for variant in ("K+V", "V-only"):
                us = timer(decode_runner(s, tables, q, variant, sp, *best[variant][0])[1])
                pps_time[pps] = pps_time.get(pps, 0.0) + us
                sweep_rows.append([f"decode {variant}", f"{max(contexts)}", f"{batch}",
                                   f"programs/SM {pps} (splits {int(sp[0])})", f"{us:.1f}"])
    best_pps = min(pps_time, key=pps_time.get)
    lines.append("decode chosen (block_n, warps, stages): " + ", ".join(f"{v} {best[v][0]}" for v in VARIANTS)
                 + f"; programs/SM {best_pps}")
    print(md_table(["op", "context", "batch", "config", "us"], sweep_rows), flush=True)

    # decode table
    kv_bytes = 2 * h_kv * d * s.k_buffer.element_size()  # base K + V per token
    r_bytes = rank * s.r_buffer.element_size()  # one half of a residual row
    rows = []
    for ctx in contexts:
        for batch in batches:
            tables, q = decode_setup(ctx, batch)
            ours_splits = choose_num_kv_splits(tables["seq_lens"], h_kv, MAX_SPLITS, s.num_sms,
                                               programs_per_sm=best_pps)
            t = {v: timer(decode_runner(s, tables, q, v, ours_splits, *best[v][0])[1]) for v in VARIANTS}
            t_s8 = timer(sglang_decode_runner(s, tables, q, torch.full((batch,), SGL_SPLITS, **i32), SGL_SPLITS)[1])
            t_sa = timer(sglang_decode_runner(s, tables, q, ours_splits, MAX_SPLITS)[1])
            tokens = batch * ctx
            b_kv, b_v, b_sgl = tokens * (kv_bytes + 2 * r_bytes + 8), tokens * (kv_bytes + r_bytes + 8), \
                tokens * (kv_bytes + 4)
            t_sgl = min(t_s8, t_sa)

            def bw(nbytes, us):
                return f"{nbytes / us / 1e3:.0f} ({100 * nbytes / us / 1e3 / copy_bw:.0f}%)"

            rows.append([ctx, batch, int(ours_splits[0]), f"{b_kv / 1e6:.0f}", f"{b_kv / copy_bw / 1e3:.1f}",
                         f"{t_s8:.1f}", f"{t_sa:.1f}", f"{t['K+V']:.1f}", f"{t['K+V fp32 rope']:.1f}",
                         f"{t['V-only']:.1f}", f"{t['K+V'] / t_sgl:.2f}", f"{t['V-only'] / t_sgl:.2f}",
                         bw(b_kv, t["K+V"]), bw(b_v, t["V-only"]), bw(b_sgl, t_sgl)])
            print(rows[-1], flush=True)
    sections += ["### Decode", md_table(
        ["ctx", "batch", "our splits", "MB read (K+V)", "floor us", "SGLang 8 splits us", "SGLang our splits us",
         "ours K+V us", "ours K+V fp32-rope us", "ours V-only us", "K+V / best SGLang", "V-only / best SGLang",
         "ours K+V GB/s (% copy)", "ours V-only GB/s (% copy)", "best SGLang GB/s (% copy)"], rows)]
    report()

    # extend: per variant, configurations that passed the isolated check (if given), each checked again here
    # (a wrong one is not timed), timed at the largest prefix, batch 1; the fastest is used for the table
    allowed = None
    if args.extend_ok:
        allowed = {(v, tuple(int(x) for x in rest)) for v, *rest in
                   (line.split()[1:6] for line in open(args.extend_ok) if line.startswith("OK "))}
    tab = s.tables([max(ext_prefix) + ext_new], [0])
    qe = torch.randn(ext_new, h_q, d, device=device).to(dtype)
    qo = torch.tensor([0, ext_new], **i32)
    best_ext = {}
    for variant, k_lora in (("kv", True), ("v", False)):
        for blocks in extend_sweep:
            key = (blocks["block_m"], blocks["block_n"], blocks["num_warps"], blocks["num_stages"])
            if allowed is not None and (variant, key) not in allowed:
                lines.append(f"extend {variant} {blocks}: failed the isolated check, not timed")
                continue
            if not check_extend(s, device, lines, blocks, k_lora):
                ok = False
                lines.append(f"extend {variant} {blocks}: FAILED correctness, not timed")
                continue
            us = timer(extend_runner(s, tab, qe, qo, ext_new, k_lora, **blocks)[1])
            sweep_rows.append([f"extend {variant}", f"{max(ext_prefix)}+{ext_new}", "1", str(blocks), f"{us:.1f}"])
            if variant not in best_ext or us < best_ext[variant][1]:
                best_ext[variant] = (blocks, us)
    rows = []
    if len(best_ext) == 2:
        lines.append(f"extend chosen: K+V {best_ext['kv'][0]}, V-only {best_ext['v'][0]}")
        for prefix in ext_prefix:
            for batch in ext_batches:
                seq = [prefix + ext_new] * batch
                tables = s.tables(seq, [i % s.num_adapters for i in range(batch)])
                q = torch.randn(batch * ext_new, h_q, d, device=device).to(dtype)
                qo = torch.arange(batch + 1, **i32) * ext_new
                t_kv = timer(extend_runner(s, tables, q, qo, ext_new, True, **best_ext["kv"][0])[1])
                t_v = timer(extend_runner(s, tables, q, qo, ext_new, False, **best_ext["v"][0])[1])
                t_s = timer(sglang_extend_runner(s, tables, q, qo, [prefix] * batch, [ext_new] * batch)[1])
                flops = batch * 4 * h_q * d * (ext_new * prefix + ext_new * (ext_new + 1) / 2)
                rows.append([prefix, ext_new, batch, f"{t_s:.0f}", f"{t_kv:.0f}", f"{t_v:.0f}", f"{t_kv / t_s:.2f}",
                             f"{t_v / t_s:.2f}", f"{flops / t_s / 1e6:.0f}", f"{flops / t_kv / 1e6:.0f}"])
                print(rows[-1], flush=True)
    sections += ["### Extend", md_table(
        ["prefix", "new", "batch", "SGLang us", "ours K+V us", "ours V-only us", "K+V / SGLang", "V-only / SGLang",
         "SGLang TFLOP/s", "ours K+V TFLOP/s"], rows),
        "### Tuning sweeps", md_table(["op", "context", "batch", "config", "us"], sweep_rows)]
    lines.append(f"correctness: {'PASS' if ok else 'FAIL'}")
    report(final=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
