"""LoRA Studio: start the app (``launch.sh`` / ``launch.bat`` run this with their arguments).

    python app.py                          local only (127.0.0.1), opens the browser
    python app.py --demo                   tiny offline model and images: try the whole flow in a minute
    python app.py --share                  a public link, always behind a login (a password is generated)
    python app.py --auth me:secret         require a login
    python app.py --host 0.0.0.0 --port 7860 --outputs D:/lora_outputs --no-browser
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="app.py", description="LoRA Studio: train and test LoRAs in the browser.")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this computer only; 0.0.0.0: your network, "
                        "with a login)")
    p.add_argument("--port", type=int, default=None, help="port (default: 7860, or the next free one)")
    p.add_argument("--share", action="store_true",
                   help="make a public gradio.live link (needs internet); a login is always required")
    p.add_argument("--auth", metavar="USER:PASSWORD", default=os.environ.get("LORA_STUDIO_AUTH"),
                   help="require this login (also read from $LORA_STUDIO_AUTH)")
    p.add_argument("--no-browser", action="store_true", help="do not open a browser tab")
    p.add_argument("--demo", action="store_true", help="tiny offline model and generated images (no download)")
    p.add_argument("--outputs", default=str(ROOT / "outputs"),
                   help="folder for runs, prepared datasets, uploads and grids (default ./outputs); the only "
                        "folder the server hands files out from")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p.parse_args(argv)


def _setup_environment(args: argparse.Namespace) -> None:
    # Gradio hands out the files in its temp folder too, and by default that is /tmp/gradio, shared by every
    # Gradio app on the machine. Inside the outputs folder it holds only this app's uploads and results, so
    # the server answers for the outputs folder and nothing else. Set before gradio is imported.
    gradio_tmp = Path(args.outputs).expanduser().resolve() / ".gradio"
    os.environ["GRADIO_TEMP_DIR"] = str(gradio_tmp)
    os.environ["GRADIO_EXAMPLES_CACHE"] = str(gradio_tmp / "cached_examples")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.demo:  # the demo never needs the network
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from lora_studio.logging_setup import setup_logging

    setup_logging(args.verbose, logging.INFO, fmt="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def _login(args: argparse.Namespace, exposed: bool) -> tuple[str, str] | None:
    """The login: --auth if given; a generated password when the app is reachable by others."""
    from lora_studio.ui.security import DEFAULT_USER, generate_password, parse_auth

    try:
        auth = parse_auth(args.auth)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    if auth is None and exposed:
        auth = (DEFAULT_USER, generate_password())
        print("\n" + "=" * 70)
        print("This app can be reached by others, so it needs a login:")
        print(f"    user:     {auth[0]}\n    password: {auth[1]}")
        print("(choose your own with --auth user:password)")
        print("=" * 70 + "\n", flush=True)
    return auth


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _setup_environment(args)
    from lora_studio.versions import InstallError, require_working_install

    try:  # a broken combination of packages: one sentence now, not a traceback halfway through training
        require_working_install()
    except InstallError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    from lora_studio.ui.security import is_local_host

    exposed = args.share or not is_local_host(args.host)
    auth = _login(args, exposed)
    print("Starting LoRA Studio (loading libraries) ...", flush=True)
    import gradio as gr  # noqa: F401  (slow import: after the login is printed)

    from lora_studio.ui.context import StudioContext
    from lora_studio.ui.studio import build_studio, launch_options

    outputs = Path(args.outputs).expanduser()
    demo = None
    if args.demo:
        from lora_studio.ui.demo import build_demo

        print("Building the demo model and images ...", flush=True)
        demo = build_demo(outputs / "demo")
    ctx = StudioContext(outputs=outputs, shared=exposed, demo=demo)
    blocks = build_studio(ctx)
    blocks.queue(default_concurrency_limit=4)
    blocks.launch(server_name=args.host, server_port=args.port, share=args.share, auth=auth,
                  auth_message="LoRA Studio: log in with the user and password printed in the terminal.",
                  inbrowser=not args.no_browser, prevent_thread_lock=True, show_error=True, quiet=False,
                  ssr_mode=False, **launch_options(ctx))
    if args.share and not blocks.share_url:
        print(f"\nThe share link could not be made (no internet connection, or the share server is blocked). "
              f"LoRA Studio keeps running on {blocks.local_url}", flush=True)
    print(f"LoRA Studio is running on {blocks.local_url}  (press Ctrl+C to stop)", flush=True)
    try:
        blocks.block_thread()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
