import sys

from kvreviver_vllm.cli import main

sys.exit(main())
