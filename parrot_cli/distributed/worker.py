"""`python -m parrot_cli.distributed.worker`: a rank that parrot's rank 0 started (see
`launch.py`); everything it needs comes from rank 0."""

import sys

from parrot_cli.distributed.runtime import follower_main

if __name__ == "__main__":
    sys.exit(follower_main())
