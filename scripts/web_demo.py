"""Browser chat: starts the OpenAI-compatible server and opens its chat page.

    python scripts/web_demo.py --weight full_sft               # opens http://127.0.0.1:8998/ in your browser
    python scripts/web_demo.py --hf_dir ./MiniMind2-hf --no_browser

The page (scripts/web/) is served by scripts/serve_openai_api.py itself: one process, one model in memory, and the
page streams from the same /v1/chat/completions endpoint every other client uses, so what you see in the browser is
exactly what the API returns. A separate UI app (MiniMind's streamlit demo) would load a second copy of the model
or need a second server. This launcher only adds opening the browser; every flag is the server's.
"""
import sys
import webbrowser
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_openai_api import build_parser, main  # noqa: E402
from trainer.trainer_utils import run_main  # noqa: E402


def launch():
    p = build_parser("Browser chat for a MiniMind checkpoint (the API server + its page)")
    p.add_argument("--no_browser", action="store_true", help="只打印地址 / only print the page's URL")
    args = p.parse_args()
    argv = [a for a in sys.argv[1:] if a != "--no_browser"]

    def ready(url):
        print(f"chat page: {url}/  (Ctrl-C stops the server)", flush=True)
        if not args.no_browser:
            webbrowser.open(url + "/")
    main(argv, on_ready=ready)


if __name__ == "__main__":
    run_main(launch, interrupted="server stopped")
