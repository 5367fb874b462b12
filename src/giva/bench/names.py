"""The names of the suites built into `giva bench`, in a module that imports nothing.

The package's ``__init__`` reads these names without importing the suites' code: the suites run as
``python -m giva.bench.<suite>`` (one fresh process per measurement), and a module the package had
imported already would run as a second copy of itself (runpy's "found in sys.modules" warning).
"""

SERVE_SUITE = "serve"
SCALE_SUITE = "scale"
GPU_SUITE = "gpu"
SKETCH_SUITE = "sketch"
FINETUNE_SUITE = "finetune"
QLORA_SUITE = "qlora"
