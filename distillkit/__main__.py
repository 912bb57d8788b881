"""``python -m distillkit`` is the ``distillkit`` command."""

from distillkit.pipelines.cli import main

main()
