"""Make the documentation's pictures by running the commands the pages show.

A page's shell blocks marked `<!-- run -->` are run in order, as written, in one shell in a
scratch folder (Getting started first, then the other pages, so that `runs/demo` exists);
every picture a page shows as `images/NAME` must then be a file the commands wrote under that
name somewhere in the folder, and is copied to docs/images/NAME. Pictures are never described
in words where they can be shown, and never drawn by hand.

    python docs/pictures.py          # run the pages' commands and refresh docs/images
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

DOCS = Path(__file__).resolve().parent
PAGES = ["index.md", "using.md"]  # in this order: the first trains runs/demo
BLOCK = re.compile(r"<!-- run -->\s*```bash\n(.*?)```", re.S)
PICTURE = re.compile(r"\]\(images/([^)\s]+)\)")


def commands(page: str) -> str:
    """The page's runnable shell blocks, in order, as one script."""
    return "\n".join(BLOCK.findall((DOCS / page).read_text()))


def pictures(page: str) -> list[str]:
    """The file names of the pictures the page shows from images/."""
    return PICTURE.findall((DOCS / page).read_text())


def run_pages(folder: Path, pages: list[str] = PAGES) -> dict[str, Path]:
    """Run the pages' commands in `folder`; each shown picture's name and the file made for it.
    Raises RuntimeError naming the page, the command's output, or a picture nothing made."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    found: dict[str, Path] = {}
    for page in pages:
        script = "set -euo pipefail\n" + commands(page)
        ran = subprocess.run(["bash", "-c", script], cwd=folder, env=env, capture_output=True,
                             text=True, timeout=900)  # fmt: skip
        if ran.returncode != 0:
            raise RuntimeError(f"{page}: the commands failed:\n{ran.stderr[-3000:]}")
        for name in pictures(page):
            made = [p for p in folder.rglob(name) if p.is_file()]
            if len(made) != 1:
                raise RuntimeError(f"{page} shows images/{name}: the commands made {len(made)}")
            found[name] = made[0]
    return found


def main() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        found = run_pages(Path(scratch))
        (DOCS / "images").mkdir(exist_ok=True)
        for name, path in found.items():
            shutil.copyfile(path, DOCS / "images" / name)
            print(f"docs/images/{name} <- {path.relative_to(scratch)}")


if __name__ == "__main__":
    main()
