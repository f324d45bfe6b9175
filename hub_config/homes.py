"""What a new user's home holds: the example notebooks, copied in before the first spawn."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

logger = logging.getLogger("parallex.hub")

#: The notebooks shipped with Parallex (the repository's notebooks/ folder).
EXAMPLES = Path(__file__).resolve().parent.parent / "notebooks"


def copy_example_notebooks(spawner) -> None:
    """Pre-spawn hook: copy the example notebooks into the user's home folder, when the
    spawner has one on this machine, without replacing notebooks the user already has."""
    home_template = getattr(spawner, "home_dir_template", None)
    if not home_template or not EXAMPLES.is_dir():
        return
    home = Path(home_template.format(username=spawner.user.name))
    home.mkdir(parents=True, exist_ok=True)
    for notebook in sorted(EXAMPLES.glob("*.ipynb")):
        target = home / notebook.name
        if not target.exists():
            shutil.copyfile(notebook, target)
            logger.info("copied %s into %s", notebook.name, home)
