"""Record the environment this rank got in out/env-<RANK>.json, then exit."""

import json
import os
from pathlib import Path

out = Path("out")
out.mkdir(exist_ok=True)
(out / f"env-{os.environ['RANK']}.json").write_text(json.dumps(dict(os.environ)))
