"""``python -m actorflow.bench``: the same as ``actorflow bench``."""

import sys

from actorflow.bench import main

sys.exit(main(sys.argv[1:]))
