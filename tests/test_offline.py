"""A conversion never touches the network: onnx2tf 1.28 fetches sample images for a fixed-batch RGB model unless
they lie in its working folder (pipeline/conversion/offline.py)."""
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent('''
    import socket, sys
    from pathlib import Path
    import numpy as np, torch
    from pipeline.conversion.offline import ONNX2TF_SAMPLE_FILE, block_network
    block_network()
    try:
        socket.create_connection(("github.com", 443), timeout=2)
        sys.exit("the network is not blocked")
    except OSError as e:
        assert "blocked" in str(e), e
    from pipeline.conversion import get_converter
    from pipeline.conversion.onnx_export import OnnxArtifact
    from pipeline.inputs.preprocessing import Preprocessing
    from pipeline.tflite.inspect import inspect
    work = Path(sys.argv[1])
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(8, 4)).eval()
    x = torch.rand(1, 3, 16, 16)
    onnx_path = work / "fixed.onnx"
    torch.onnx.export(net, x, str(onnx_path), input_names=["input"], output_names=["logits"], dynamo=False)  # batch 1
    art = OnnxArtifact(path=onnx_path, bytes=onnx_path.stat().st_size, opset=17, input_name="input",
                       output_name="logits", dynamic_batch=False, max_abs_error=None, tolerance=None, samples=0,
                       source="given")
    pre = Preprocessing(input_shape=(3, 16, 16), source_layout="NCHW", source_dtype="float32", scale=1.0,
                        mean=(0.0,) * 3, std=(1.0,) * 3, raw_range=(0.0, 1.0))
    calib = np.random.RandomState(0).rand(40, 3, 16, 16).astype(np.float32)
    tfl = get_converter("onnx2tf").convert(art, calib, pre, per_channel=True, out_path=work / "m.tflite")
    assert inspect(tfl.path).fully_int8
    assert not (Path.cwd() / ONNX2TF_SAMPLE_FILE).exists()
    print("ok")
''')


def test_a_fixed_batch_rgb_model_converts_with_the_network_blocked(tmp_path):
    p = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], cwd=tmp_path, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), (p.stdout[-1500:], p.stderr[-3000:])
    assert sorted(q.name for q in tmp_path.iterdir()) == ["fixed.onnx", "m.tflite"]
