"""`meshtune compress-search`: which compression of a trained run is worth deploying, measured on its ExecuTorch
program. Rule-based: a fixed, reasoned order over a small grid, and two rules that prune it as results come in.

    meshtune compress-search runs/tiny --out runs/tiny-search --budget 6 --steps 40 --target-size 600KB
    meshtune compress-search runs/tiny --out runs/tiny-search --budget 9 --resume    # 3 more candidates
    meshtune report runs/tiny-search                                               # front.png + report.md

The grid (space.py): structured pruning (25% / 50% of the heads and MLP channels, cut out of the program) or
unstructured pruning (50% magnitude, 2:4), x weights (fp32; int8 dynamic activations with int8 or int4 weights),
x distillation from the run itself (off / on). Each candidate is a short fine-tune from the run's weights through
the normal trainer with the bundled recipes (compress/prune, compress/prune-distill, finetune/qat; `--steps`),
exported with `meshtune export --format executorch --scheme ...`, and measured in the ExecuTorch runtime on one
thread against the dense program (the run itself, fp32, always measured first): .pte size, prefill latency,
decode tokens/s (timed in turns with the dense program: the ratios are stable across a long search) and the
program's own accuracy. Quantized weights of an unpruned model come from QAT (finetune/qat); of a pruned model
from post-training quantization of its fine-tune (QAT's module swap does not keep pruning masks, so the two
recipes do not stack), which therefore serves its fp32, int8 and int4 candidates alike.

Why this order (rule 1, `space.FIRST`). ExecuTorch's XNNPACK delegate runs dense kernels: a program's size and
latency follow its dense shapes and weight bytes, not its zeros. So what can make a program smaller or faster is
fewer bytes per weight (int8 ~4x smaller block weights, int4 ~7x; XNNPACK's int8/int4 kernels decode 2.6x / 3.3x
faster than eager fp32 on the demo base, bench/bench_executorch.py, but on a 32-wide model the dynamic activation
quantization costs more than it saves: measured 0.3x the fp32 program's decode there) and fewer weights in the
dense shapes (structured pruning; a distilled student is the same thing reached from the teacher's own weights,
which a short fine-tune needs). Distillation costs the program nothing (same shapes), so structured candidates are
tried with it first; the run itself is the teacher. For a size target int8 goes first (the largest gain for the
least accuracy), for a latency or speedup target structured 50% + KD; then the other of the two, then their
combination, int4, 25%. Unstructured 50% and 2:4 are each measured once early, as controls, not assumed: their
programs come out the size and speed of the dense one (the zeros are stored and multiplied) with less accuracy.

Rules as results come in (space.skipped): rule 2, once a candidate meets the target, candidates compressing at
least as far on every axis (same pruning kind and distillation) are not tried: they are expected cheaper and
less accurate, and the search is after the most accurate candidate that meets the target. Rule 3, once a
measured unstructured program is no smaller than the dense one (>= 0.95x its size; size alone, because paired
decode ratios of identical shapes still moved +-20% on a loaded machine), the remaining unstructured candidates
are not tried. Measured on the demo base (dim 128 x 3, 40-step fine-tunes): 50% magnitude, 1.00x the dense .pte.

The front (pareto.py) is accuracy (ties broken by loss) against the target's metric: .pte size (default),
decode ms/token, or decode time relative to the dense program (--target-speedup). Every candidate's line is
appended to results.jsonl as it ends, so an interrupted search resumes where it stopped (run.py).
"""
