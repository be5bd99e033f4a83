#!/usr/bin/env bash
# The kernels' GPU check in one command, for a CUDA machine with torch and triton but not
# necessarily this project installed (run from the repository root):
#     bash kernels/gpu_check.sh [OUT_DIR]
# 1. the kernel tests, compiled (tests/test_kernels.py compares each kernel with its reference,
#    and runs the worker's processor in its GPU form against the CPU form);
# 2. the step report at the issue's shape (batch 256, hidden 4096, 10 outputs, bf16), linear
#    and with the default head's gated 128-unit MLP, and at the default model's shape;
# 3. the head's sweep over tile shapes, warp counts and the split over H;
# 4. compute-sanitizer (memcheck) on the one shape that hit an illegal address (64-row tiles
#    with the MLP), where the tool exists.
# Each step has its own time limit and writes OUT_DIR/<step>.txt as it goes.
set -u
out="${1:-${OUT:-kernel_check}}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if ! python3 -c "import safeserve.kernels" 2>/dev/null; then
    # Not installed: the folders as the safeserve namespace's sub-packages (the worker's
    # processor test in tests/test_kernels.py also needs server/ and models/).
    pkg="$(mktemp -d)"
    mkdir -p "$pkg/safeserve"
    for part in kernels server models; do ln -sfn "$PWD/$part" "$pkg/safeserve/$part"; done
    export PYTHONPATH="$pkg${PYTHONPATH:+:$PYTHONPATH}"
fi
bench="python3 -m safeserve.kernels.bench --plain"
python3 -c "import torch, triton; print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__)" | tee "$out/env.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 | tail -5 | tee "$out/tests.txt"
{
    echo "== issue shape, linear"; timeout 60 $bench
    echo "== issue shape, gated MLP 128"; timeout 60 $bench --mlp-units 128 --mlp-gate
    echo "== default model: hidden 576, batch 16, fp32, gated MLP 128"
    timeout 60 $bench --batch 16 --hidden 576 --dtype float32 --mlp-units 128 --mlp-gate
} 2>&1 | tee "$out/bench.txt"
{
    timeout 120 python3 -m safeserve.kernels.bench --sweep
    timeout 120 python3 -m safeserve.kernels.bench --sweep --mlp-units 128 --mlp-gate
} 2>&1 | tee "$out/sweep.txt"
if command -v compute-sanitizer >/dev/null; then
    timeout 180 compute-sanitizer --tool memcheck python3 - <<'EOF' 2>&1 | tail -30 | tee "$out/memcheck.txt"
import torch
from safeserve.kernels.safety_head import _safety_scores_triton, safety_scores_reference
g = torch.Generator().manual_seed(0)
h = torch.randn(256, 4096, generator=g).cuda().bfloat16()
w, b = (torch.randn(10, 4096, generator=g) / 64).cuda(), torch.randn(10, generator=g).cuda()
mlp = ((torch.randn(128, 4096, generator=g) / 64).cuda(), torch.randn(128, generator=g).cuda(),
       (torch.randn(10, 128, generator=g) / 11).cuda(), (torch.randn(4097, generator=g) / 64).cuda())
for blocks, warps in (((64, 16), 4), ((64, 16), 8), ((64, 32), 4)):
    out = torch.empty(256, 10, device="cuda")
    _safety_scores_triton(h, w, b, out, mlp, blocks=blocks, num_warps=warps)
    torch.cuda.synchronize()
    err = (out - safety_scores_reference(h, w, b, mlp)).abs().max().item()
    print("blocks", blocks, "warps", warps, "max abs err", err)
EOF
fi
