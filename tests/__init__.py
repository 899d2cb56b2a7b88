"""Safehold's tests: one package per source package (``tests/<package>/`` mirrors
``src/safehold/<package>/``), helpers in ``tests.support``.

Every test folder is a package (it has an ``__init__.py``), so test modules are imported under
unique dotted names (``tests.broker.test_http``, ``tests.records.test_http``) and modules with the
same file name in different folders do not collide; pytest's default import mode puts the
checkout root on ``sys.path`` for that.
"""
