"""`import dilated_attention_pytorch` stays cheap: no heavy subsystem at import."""

import subprocess
import sys

CHECK = """
import sys, time
import torch
start = time.perf_counter()
import dilated_attention_pytorch
print(time.perf_counter() - start)
print(",".join(m for m in ("torch._dynamo", "torch._inductor", "triton", "matplotlib") if m in sys.modules))
"""


def test_import_pulls_in_no_compiler_and_takes_under_a_second_over_torch():
    seconds, heavy = subprocess.run(
        [sys.executable, "-c", CHECK], capture_output=True, text=True, check=True
    ).stdout.split("\n")[:2]
    # torch._dynamo alone took ~2 s when a module-level torch.compiler.disable imported it
    assert heavy == "", f"imported at `import dilated_attention_pytorch`: {heavy}"
    assert float(seconds) < 1.0, f"import took {float(seconds):.2f} s over torch"
