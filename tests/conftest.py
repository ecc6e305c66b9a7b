"""One headless Scipion configuration for the whole test session.

pyworkflow reads its configuration from the environment when it is first imported, so
this runs before any test module (or plugin) imports pyworkflow/pwem.  The root is
``$CRYOCLASS_TEST_SCIPION_HOME`` when set (kept, for inspection), else a temporary folder
removed at exit.  Test modules may still call ``setup_for_tests()``: it returns this one.
"""
from cryoclass_plugin.scipion_env import setup_for_tests

SCIPION_ENV = setup_for_tests()
