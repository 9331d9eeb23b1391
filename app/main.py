"""Start the PMPO demo: ``python app.py`` / ``pmpo app`` ``[--model NAME] [--pretrained TAG|PATH] [--checkpoint FILE]
[--device auto|cpu|cuda] [--port N] [--share]``.

Every option can also come from the environment, which is how Hugging Face Spaces configures
an app: PMPO_MODEL, PMPO_PRETRAINED, PMPO_CHECKPOINT, PMPO_DEVICE, PORT or GRADIO_SERVER_PORT,
GRADIO_SERVER_NAME, and PMPO_WARMUP=0 (skip compiling UMAP in the background at start); the owner's
training limits are PMPO_MAX_TRAIN_SECONDS, PMPO_MAX_TRAIN_IMAGES and PMPO_MAX_TRAININGS
(``pmpo.app.train.TrainLimits``). Without a network the default backbone (ViT-B-16-quickgelu + openai) is
replaced by the shipped offline ShapeWorld CLIP, and the page says so.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import signal
import sys
import threading
import time
import warnings


def _exit_once(*_) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(description="PMPO Gradio demo (zero-shot CLIP vs. prior vs. learned prompts).")
    p.add_argument("--model", default=env("PMPO_MODEL"),
                   help="open_clip model name or local-dir:PATH (default: ViT-B-16-quickgelu; env PMPO_MODEL)")
    p.add_argument("--pretrained", default=env("PMPO_PRETRAINED"),
                   help="pretrained tag or weights file, 'none' = random init (default: openai; env PMPO_PRETRAINED)")
    p.add_argument("--checkpoint", default=env("PMPO_CHECKPOINT"),
                   help="prompt checkpoint (.safetensors) selected at start (env PMPO_CHECKPOINT)")
    p.add_argument("--device", default=env("PMPO_DEVICE", "auto"), help="auto, cpu, cuda or cuda:N (env PMPO_DEVICE)")
    p.add_argument("--port", type=int, default=int(env("PORT") or env("GRADIO_SERVER_PORT") or 7860),
                   help="port (env PORT or GRADIO_SERVER_PORT; default 7860)")
    p.add_argument("--host", default=env("GRADIO_SERVER_NAME", "0.0.0.0" if env("SPACE_ID") else "127.0.0.1"),
                   help="address to bind (env GRADIO_SERVER_NAME)")
    p.add_argument("--share", action="store_true", help="create a public gradio.live link")
    p.add_argument("-v", "--verbose", action="store_true", help="show library logs")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # open_clip logs download failures on the root logger; the app says it better in its notice.
    # Our own loggers still reach the server log: a visitor sees one line, the log has the traceback.
    logging.basicConfig(level=logging.INFO if args.verbose else logging.CRITICAL,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pmpo").setLevel(logging.INFO if args.verbose else logging.WARNING)
    if not args.verbose:
        warnings.filterwarnings("ignore", category=FutureWarning)
    started = time.perf_counter()

    def say(message: str) -> None:  # progress while the app loads (it takes seconds before the URL)
        print(f"[{time.perf_counter() - started:5.1f} s] {message}", file=sys.stderr, flush=True)

    say("starting the PMPO demo: importing torch, open_clip and gradio…")
    from pmpo.app import zerogpu
    from pmpo.app.startup import open_state
    from pmpo.app.ui import allowed_paths, build_demo
    from pmpo.device import resolve_device
    from pmpo.errors import PMPOError

    say(f"loading the backbone ({args.model or 'default: ViT-B-16-quickgelu + openai, else the offline model'})…")
    # On ZeroGPU the server process never holds a GPU (its CUDA is the platform's stand-in): the
    # models stay on the CPU here and each kernel moves its own copy to the GPU lent for the call.
    device = "cpu" if zerogpu.active() else resolve_device(args.device)
    try:
        state = open_state(args.model, args.pretrained, args.checkpoint, device=device)
    except PMPOError as exc:
        print(f"app.py: error: {exc}", file=sys.stderr)
        return 1
    if zerogpu.active():
        state.notices.append("Running on **ZeroGPU**: every image pass, text pass and training runs on a GPU lent "
                             "for that call (the first call of a visitor waits for one).")
    for notice in state.notices:
        print(f"notice: {notice}", file=sys.stderr)
    atexit.register(state.cleanup)
    # SIGTERM (a Space restarting, `kill`) exits through Python so that the cleanup runs; a second one
    # (a supervisor and `timeout` both forwarding it) must not interrupt that cleanup half-way.
    signal.signal(signal.SIGTERM, _exit_once)
    try:
        demo = build_demo(state)
    except PMPOError as exc:  # e.g. an owner's limit that is not a number
        print(f"app.py: error: {exc}", file=sys.stderr)
        return 1
    if os.environ.get("PMPO_WARMUP", "1") != "0":
        from pmpo.app.embeddings import warm_up

        threading.Thread(target=warm_up, name="pmpo-umap-warm-up", daemon=True).start()
    say(f"loaded {state.default_spec.label} on {state.device}; building the page and starting the server…")
    # show_error: an input that Gradio itself refuses (a wrong type, a value outside a list) reaches the API
    # client as its one-line reason, not as a generic failure; the handlers turn their own errors into messages.
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, allowed_paths=allowed_paths(state),
                show_error=True,
                footer_links=["api"])
    return 0

