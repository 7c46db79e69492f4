"""The package's public names resolve, lazily."""

import subprocess
import sys

import preftune


def test_every_public_name_resolves():
    for name in preftune.__all__:
        assert getattr(preftune, name) is not None, name


def test_importing_the_package_does_not_import_the_training_stack():
    code = "import sys, preftune; print('accelerate' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
