"""One real SafeServe server per test session: the real vLLM CPU engine on the embedded
SmolLM2 model, with a hand-built safety head (tests/heads.py), over real HTTP on loopback."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

# On a CPU-only machine the kernel tests run Triton in interpreter mode, which must be chosen
# before anything imports triton (the server modules do, through kernels/): set it for this
# pytest process only. Servers started by the tests get an environment without it.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_configure(config):
    """Compose into a cache of this session's own: the tests compose checkpoints over
    temporary base models, which must not pile up in the user's cache (~/.cache/safeserve)
    once pytest deletes their bases. The converted default model is shared, by a symlink,
    so it is converted at most once per machine, as in use."""
    from safeserve.models.model_store import DEFAULT_MODEL_NAME, cache_dir, ensure_default_model

    real = ensure_default_model(cache_dir() / "models")
    session = Path(tempfile.mkdtemp(prefix="safeserve-test-cache-"))
    (session / "models").mkdir()
    (session / "models" / DEFAULT_MODEL_NAME).symlink_to(real, target_is_directory=True)
    config._safeserve_cache = session
    os.environ["SAFESERVE_CACHE_DIR"] = str(session)


def pytest_unconfigure(config):
    session = getattr(config, "_safeserve_cache", None)
    if session is not None:
        shutil.rmtree(session, ignore_errors=True)  # the shared model is a symlink: kept


# Importing TRL sets VLLM_LOGGING_LEVEL=ERROR in this process (trl/_compat.py): servers started
# after a training test would inherit it and log nothing of vLLM's (the workers' lines
# included). They get the session's own value back.
_VLLM_LOGGING_LEVEL = os.environ.get("VLLM_LOGGING_LEVEL")


def server_env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "SAFESERVE_FORCE_TRITON", "VLLM_LOGGING_LEVEL")}
    if _VLLM_LOGGING_LEVEL is not None:
        env["VLLM_LOGGING_LEVEL"] = _VLLM_LOGGING_LEVEL
    return {**env, **(extra or {})}

REPO = Path(__file__).resolve().parents[1]
SAFESERVE = Path(sys.executable).with_name("safeserve")
START_TIMEOUT_S = float(os.environ.get("SAFESERVE_TEST_START_TIMEOUT", "900"))

TEST_PRESETS = """
default:
  allow: [violence]
  on_violation: refuse
strict:
  allow: []
  on_violation: refuse
stopper:
  allow: []
  on_violation: stop
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, url: str, model: str, proc: subprocess.Popen, log: Path, model_dir: Path):
        self.url, self.model, self.proc, self.log, self.model_dir = url, model, proc, log, model_dir

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120, **kw)


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"server not ready after {timeout}s:\n{log.read_text()[-4000:]}")


def start_server(tmp: Path, *args: str, env: dict | None = None) -> tuple[str, subprocess.Popen, Path]:
    port = free_port()
    log = tmp / f"server-{port}.log"
    proc = subprocess.Popen(
        [str(SAFESERVE), "serve", "--port", str(port), *args],
        stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=tmp,
        env=server_env(env),
    )
    url = f"http://127.0.0.1:{port}"
    return url, proc, log


@contextlib.contextmanager
def running_server(tmp: Path, *args: str, env: dict | None = None):
    """Start ``safeserve serve`` with ``args``, wait until it is ready, yield (url, proc, log),
    and stop it on exit (terminate, then kill if it does not exit in 30 s)."""
    for attempt in range(3):
        url, proc, log = start_server(tmp, *args, env=env)
        try:
            wait_ready(url, proc, log, START_TIMEOUT_S)
            break
        except RuntimeError:
            proc.kill()
            proc.wait(30)
            # free_port's port can be taken by another process before the server binds it:
            # start again on a new one; any other failure is the test's to see.
            if attempt == 2 or "address already in use" not in log.read_text(errors="replace"):
                raise
    try:
        yield url, proc, log
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def save_tiny_llama(out: Path, tok, hidden: int = 64, layers: int = 2, kv_heads: int = 2,
                    max_positions: int = 512) -> None:
    """A random Llama (seed 0; two attention heads, tied embeddings) over ``tok``'s vocabulary
    and special tokens, saved to ``out``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=2,
                      num_key_value_heads=kv_heads, head_dim=hidden // 2,
                      max_position_embeddings=max_positions, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(str(out))


def tiny_llama_with_default_tokenizer(out: Path) -> Path:
    """A 2-layer random Llama (hidden 64) with the embedded default model's real tokenizer,
    saved to ``out``; prepares the default model first if needed (offline: it ships as a
    package), so a cold cache runs these tests instead of skipping them."""
    from transformers import AutoTokenizer

    from safeserve.models.model_store import ensure_default_model

    tok = AutoTokenizer.from_pretrained(str(ensure_default_model()))
    save_tiny_llama(out, tok)
    tok.save_pretrained(str(out))
    return out


CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_chatml_tokenizer(out: Path, corpus: list[str], vocab_size: int,
                          template: str = CHATML):
    """A byte-level BPE tokenizer trained on ``corpus``, with ChatML's special tokens and a
    ChatML ``template``, saved to ``out``; returned."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>",
                                  eos_token="<|im_end|>", pad_token="<|im_end|>",
                                  unk_token="<|endoftext|>")
    tok.chat_template = template
    tok.save_pretrained(out)
    return tok


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matmuls on a busy 2-core box are ~100x slower with two OpenMP threads."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def base_model_dir() -> Path:
    from safeserve.models.model_store import ensure_default_model

    return ensure_default_model()


@pytest.fixture(scope="session")
def server(tmp_path_factory, base_model_dir) -> Server:
    from heads import build_test_head

    tmp = tmp_path_factory.mktemp("server")
    model_dir = build_test_head(base_model_dir, tmp)
    presets = tmp / "presets.yaml"
    presets.write_text(TEST_PRESETS)
    with running_server(tmp, "--model", str(model_dir), "--presets", str(presets),
                        "--served-model-name", "smol", "--max-num-seqs", "64") as (url, proc, log):
        yield Server(url, "smol", proc, log, model_dir)


@pytest.fixture()
def http(server) -> httpx.Client:
    with server.client() as c:
        yield c


@pytest.fixture()
def oai(server):
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
