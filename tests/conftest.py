"""Test configuration.

``pytest`` (``--device cpu``, the default): Triton reads ``TRITON_INTERPRET`` when a ``@triton.jit``
function is *defined*, so it is set here, before any kernel module is imported: CI has no GPU, and
the interpreter runs every kernel on CPU tensors.

``pytest --device cuda``: every test runs on CUDA tensors with the kernels compiled for the GPU (so
``TRITON_INTERPRET`` must not be set). The tests are not edited for it: ``tests/device_mode.py``
moves every tensor a test creates to the GPU, drawing the same numbers as the CPU run, while fxcurv
places its own tensors as it would for a user. TF32 is switched off: the tests' float32 tolerances
are float32's. Markers, each with its reason: ``cpu_only`` runs a test on CPU tensors under
``--device cuda``; ``cuda_only`` skips a test unless ``--device cuda``.
"""

import os
import sys

_INTERPRET_GIVEN = os.environ.get("TRITON_INTERPRET")
os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

DEVICES = ("cpu", "cuda")
_MODE = pytest.StashKey()


def pytest_addoption(parser):
    parser.addoption(
        "--device", choices=DEVICES, default="cpu",
        help="where the tests run: 'cpu' (Triton kernels in the interpreter; the default) or 'cuda' "
             "(every test's tensors on the GPU, kernels compiled; see tests/conftest.py)")


def pytest_configure(config):
    import fxcurv.passes.pipeline

    # Every program the tests build is linted after every pass.
    fxcurv.passes.pipeline.CHECK = True
    config.addinivalue_line("markers", "cpu_only(reason): under --device cuda, run on CPU tensors (say why)")
    config.addinivalue_line("markers", "cuda_only(reason): skipped unless --device cuda (say why)")
    if config.getoption("device") != "cuda":
        return
    if _INTERPRET_GIVEN not in (None, "", "0"):
        raise pytest.UsageError(f"--device cuda compiles the Triton kernels, but TRITON_INTERPRET={_INTERPRET_GIVEN} "
                                "is set in the environment: unset it")
    if not torch.cuda.is_available():
        raise pytest.UsageError("--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False; "
                                f"torch {torch.__version__}, CUDA build {torch.version.cuda})")
    os.environ.pop("TRITON_INTERPRET", None)  # set above by default; no kernel is defined yet
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    from device_mode import OnDevice, fxcurv_dir

    mode = OnDevice("cuda", skip_callers_in=(fxcurv_dir(),))
    mode.__enter__()
    config.stash[_MODE] = mode


def pytest_unconfigure(config):
    mode = config.stash.get(_MODE, None)
    if mode is not None:
        mode.__exit__(None, None, None)


def _reason(marker) -> str | None:
    return marker.kwargs.get("reason") or (marker.args[0] if marker.args else None)


def pytest_collection_modifyitems(config, items):
    for item in items:
        for name in ("cpu_only", "cuda_only"):
            marker = item.get_closest_marker(name)
            if marker is not None and not _reason(marker):
                raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.{name} needs a reason")


@pytest.fixture(autouse=True)
def _test_device(request):
    mode = request.config.stash.get(_MODE, None)
    cuda_only = request.node.get_closest_marker("cuda_only")
    if cuda_only is not None and mode is None:
        pytest.skip(f"needs --device cuda: {_reason(cuda_only)}")
    cpu_only = request.node.get_closest_marker("cpu_only")
    if cpu_only is not None and mode is not None:
        # recorded in the report (and the junit XML), which pytest-xdist's workers send back too
        request.node.user_properties.append(("ran_on", f"cpu (cpu_only: {_reason(cpu_only)})"))
        with mode.off():
            yield
    else:
        yield


def pytest_report_header(config):
    if config.stash.get(_MODE, None) is None:
        return None
    return (f"fxcurv tests on cuda: {torch.cuda.get_device_name()} (capability "
            f"{'.'.join(map(str, torch.cuda.get_device_capability()))}), torch {torch.__version__}, "
            f"CUDA {torch.version.cuda}; Triton kernels compiled; TF32 off")


def pytest_terminal_summary(terminalreporter, config):
    if config.stash.get(_MODE, None) is None:
        return
    on_cpu = sorted({f"{r.nodeid}: {value}" for reports in terminalreporter.stats.values() for r in reports
                     if getattr(r, "when", None) == "call"
                     for key, value in getattr(r, "user_properties", ()) if key == "ran_on"})
    terminalreporter.write_line(f"--device cuda: {len(on_cpu)} test(s) ran on CPU tensors"
                                + "".join(f"\n  {line}" for line in on_cpu))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module of tiny tensors (faster, and much faster on a busy machine,
    where idle threads spin); the previous setting is restored for the other modules. A module opts in
    with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
