"""Record argv and the environment exactly as received, in out/<RANK>.json."""

import json
import os
import sys
from pathlib import Path

out = Path("out")
out.mkdir(exist_ok=True)
(out / f"{os.environ['RANK']}.json").write_text(json.dumps({"argv": sys.argv[1:], "env": dict(os.environ)}))
