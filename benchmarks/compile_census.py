"""Which Triton specializations does a cold start compile, and how long does each take?

    source benchmarks/device_env.sh
    python3 benchmarks/compile_census.py benchmarks/configs/llama3.1-8b --out $OUT/census.jsonl \
        [--workloads nanovllm,decode1,throughput8k]
    python3 benchmarks/compile_census.py --summarize census.jsonl llama3.1-8b   # anywhere

Builds the engine as `kvflow bench throughput` does (dummy weights, bf16, 4096-token context,
1024 sequences, 16384 tokens a step) with an empty Triton cache, and records every compile
through Triton's jit hooks: kernel, specialization (constexprs, the launch options, and each
integer / pointer argument's attributes: divisible by 16, == 1), seconds, and the startup phase
it fell in (profile, warm-up, sampling warm-up, graph capture). With --workloads, the bench
workloads then run and any compile while they do is recorded as "serving": a specialization
the warm-up missed, compiled inside a request. The last record is the startup summary.

--summarize prints, per kernel, its variants and the fields in which they differ: a kernel
compiled in variants that differ only in an integer argument which sizes a loop or a mask is a
cold-start cost with no run-time gain (session 23, docs/performance.md).
"""
import argparse
import collections
import json
import os
import sys
import tempfile
import time
import traceback

# Startup functions (kvflow/worker) -> phase, matched on the compile's stack. Session 23's files
# in results/cold-start-s23/ were recorded before "_profile_peak" was listed: their "other"
# compiles are the memory-profile run's.
_PHASES = (("_warm_up_sampling", "sampling"), ("capture", "graphs"), ("warm_up", "warmup"),
           ("_profile_peak", "profile"))
_serving = False


def _phase() -> str:
    if _serving:
        return "serving"
    names = [f.name for f in traceback.extract_stack()]
    for needle, phase in _PHASES:
        if any(needle in n for n in names):
            return phase
    return "other"


def compact(specialization_data: str) -> dict:
    """Triton's specialization JSON -> {types and attrs ("div16" or "") of the runtime
    arguments, constexprs, num_warps, num_stages}: what makes two compiles of one kernel differ."""
    d = json.loads(specialization_data)
    names = list(d["signature"])
    consts = {names[k[0]]: v for k, v in zip(d["constant_keys"], d["constant_vals"])}
    attrs = {names[k[0]]: ",".join("div16" if a == ["tt.divisibility", 16] else str(a) for a in v)
             for k, v in zip(d["attrs_keys"], d["attrs_vals"])}
    # An integer argument equal to 1 arrives as a constexpr 1 (Triton's == 1 specialization).
    consts = {n: v if isinstance(v, (int, float, bool, str, type(None))) else str(v)
              for n, v in consts.items()}
    types = {n: t for n, t in d["signature"].items() if t != "constexpr"}
    return dict(types=types, constexprs=consts, attrs={n: attrs.get(n, "") for n in types},
                num_warps=d["options"]["num_warps"],
                num_stages=d["options"]["num_stages"])


def summarize(path: str, model: str) -> None:
    by = collections.defaultdict(list)
    for line in open(path):
        r = json.loads(line)
        if r["model"] == model and r["record"] == "compile":
            by[r["kernel"]].append(r)
        elif r["model"] == model and r["record"] == "startup":
            print({k: v for k, v in r.items() if k not in ("model", "record")})
    for kernel, rs in sorted(by.items(), key=lambda kv: -sum(r["s"] for r in kv[1])):
        rows = [{**r["spec"]["constexprs"],
                 **{n: t + ("/" + r["spec"]["attrs"][n] if r["spec"]["attrs"][n] else "")
                    for n, t in r["spec"]["types"].items()},
                 "warps": r["spec"]["num_warps"], "stages": r["spec"]["num_stages"]} for r in rs]
        vary = [k for k in rows[0] if len({str(row.get(k)) for row in rows}) > 1]
        print(f"== {kernel} {len(rs)} variants, {sum(r['s'] for r in rs):.1f} s; differing: {vary}")
        for r, row in zip(rs, rows):
            print(f"   {r['phase']:8s} {r['s']:5.2f} s  " + " ".join(f"{k}={row.get(k)}" for k in vary))


def main() -> None:
    global _serving
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("model_name", nargs="?", help="with --summarize: the record's model")
    ap.add_argument("--out")
    ap.add_argument("--summarize", action="store_true", help="MODEL is a census file: print it")
    ap.add_argument("--workloads", default="",
                    help="comma-separated bench workloads to run once ready (nanovllm, decode1, "
                         "throughput8k): a compile while they run is one the warm-up missed, "
                         "inside a request")
    args = ap.parse_args()
    if args.summarize:
        return summarize(args.model, args.model_name)
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-cold-")
    os.environ.setdefault("KVFLOW_CACHE_DIR", tempfile.mkdtemp(prefix="kvflow-cold-"))
    from triton import knobs

    started: dict[str, float] = {}
    records: list[dict] = []

    def pre(*, key, repr, fn, compile, is_manual_warmup, already_compiled):
        started[str(key)] = time.perf_counter()
        return None

    def post(*, key, repr, fn, compile, is_manual_warmup, already_compiled):
        t0 = started.pop(str(key), None)
        records.append(dict(kernel=f"{fn.module}.{fn.name}", phase=_phase(),
                            spec=compact(compile["specialization_data"]),
                            s=round(time.perf_counter() - t0, 3) if t0 else None))
        return None

    knobs.runtime.jit_cache_hook = pre
    knobs.runtime.jit_post_compile_hook = post
    from kvflow import LLM
    t0 = time.perf_counter()
    llm = LLM(args.model, load_format="dummy", dtype="bfloat16", max_model_len=4096,
              max_num_seqs=1024, max_num_batched_tokens=16384, skip_tokenizer_init=True)
    ctor = time.perf_counter() - t0
    model = os.path.basename(os.path.normpath(args.model))
    timings = llm.llm_engine.startup_timings()
    startup = list(records)
    runs = []
    if args.workloads:
        from kvflow.bench.offline import WORKLOADS
        _serving = True
        for w in args.workloads.split(","):
            r = WORKLOADS[w](llm, {}, 0.6)
            runs.append(dict(workload=w, output_tok_s=r["output_tok_s"]))
    summary = dict(commit=os.environ.get("KVFLOW_COMMIT"), compiles=len(startup),
                   compile_s=round(sum(r["s"] or 0 for r in startup), 2),
                   serving_compiles=len(records) - len(startup), workloads=runs,
                   llm_constructor_s=round(ctor, 2), **timings)
    with open(args.out, "a") as f:
        for r in records:
            f.write(json.dumps(dict(model=model, record="compile", **r)) + "\n")
        f.write(json.dumps(dict(model=model, record="startup", **summary)) + "\n")
    print(model, summary, file=sys.stderr)
    llm.shutdown()


if __name__ == "__main__":
    main()
