# Run by IPython in the user namespace at kernel start: keep it tidy (one
# function, deleted afterwards).


def _broker_sandbox_startup():
    from IPython import get_ipython
    from IPython.core.magic import register_line_magic

    from kernel_profile import audit

    ip = get_ipython()

    def _no_shell(*args, **kwargs):
        audit._refuse_process("running shell commands from Python (!cmd, %sx, %%bash)")

    # IPython's ! and %sx go through these; refuse them with the hint
    # rather than a bare "sh: not found".
    ip.system = _no_shell
    ip.getoutput = _no_shell

    message = (
        "[sandbox] package installation is unavailable: this session has no network and "
        "cannot install packages. Preinstalled: pandas, numpy, scipy, matplotlib, seaborn, "
        "reportlab, pillow, openpyxl, xlrd, odfpy, pyyaml, lxml, h5py, netCDF4, xarray, "
        "python-docx, python-pptx, pypdf, beautifulsoup4, markdown, tabulate."
    )

    def _no_install(line=""):
        raise audit.SandboxPermissionError(message)

    for name in ("pip", "conda", "mamba", "uv"):
        register_line_magic(name)(_no_install)

    # Shell cells (a transcript's RunShellCommand cells read "%%bash ...")
    # cannot run in a kernel that may not start processes.  Under nbclient or
    # papermill they are skipped with a note instead of failing the notebook.
    from IPython.core.magic import register_cell_magic

    def _skip_shell_cell(line, cell):
        import sys

        sys.stderr.write("[sandbox] shell cell skipped: this kernel cannot start processes. Run it with the "
                         "RunShellCommand tool (broker replay does this).\n")

    for name in ("bash", "sh", "script", "system"):
        register_cell_magic(name)(_skip_shell_cell)

    # Figures left open are shown at the end of the cell, as Jupyter's inline
    # backend does (its own post_execute hook shows every open figure once
    # and closes it; plt.show() and plt.close() have already closed theirs).
    # A figure saved with savefig and left open carries its file in the
    # display's metadata (below), so the broker reports it once, as the file.
    # BROKER_FIGURE_AUTOSHOW=0 (SandboxSettings.figure_autoshow) turns this
    # off: then only plt.show() or display(fig) show a figure.  Registered
    # before the backend's hook (added when pyplot is first imported), this
    # one runs first: it drops the pending auto-display and closes the
    # figures left open, as the backend does after showing them.
    import os

    def _no_auto_display():
        import sys

        inline = sys.modules.get("matplotlib_inline.backend_inline")
        if inline is None:
            return
        inline.show._draw_called = False
        inline.show._to_draw = []
        plt = sys.modules.get("matplotlib.pyplot")
        if plt is not None and plt.get_fignums():
            plt.close("all")

    if os.environ.get("BROKER_FIGURE_AUTOSHOW", "1").strip().lower() in ("0", "false", "no", "off"):
        ip.events.register("post_execute", _no_auto_display)

    # A figure saved with savefig and then shown (plt.show(), display(fig))
    # is one chart: its display carries the file it was saved to in the
    # metadata ("broker_saved_as"), so a client that already shows the saved
    # file can skip the display.  Figure.savefig is wrapped when
    # matplotlib.figure is first imported (not before: importing matplotlib at
    # start would slow every kernel).  A figure changed after it was saved is
    # stale again and its display carries no mark.
    import importlib.machinery
    import sys

    def _mark_saves(module):
        figure_cls = module.Figure
        native = figure_cls.savefig

        def savefig(self, fname, *args, **kwargs):
            result = native(self, fname, *args, **kwargs)
            if isinstance(fname, (str, os.PathLike)):
                path = os.path.abspath(os.fspath(fname))
                saved = getattr(self, "_broker_saved_as", [])
                self._broker_saved_as = [p for p in saved if p != path] + [path]
                # savefig leaves the figure stale (it restores dpi and colours);
                # as drawn now it is what was saved.
                self.stale = False
            return result

        savefig.__doc__ = native.__doc__
        savefig.__wrapped__ = native
        figure_cls.savefig = savefig

    class _FigureImportHook:
        def find_spec(self, name, path=None, target=None):
            if name != "matplotlib.figure":
                return None
            sys.meta_path.remove(self)
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
                return spec
            exec_module = spec.loader.exec_module

            def exec_and_mark(module):
                exec_module(module)
                _mark_saves(module)

            spec.loader.exec_module = exec_and_mark
            return spec

    if "matplotlib.figure" in sys.modules:
        _mark_saves(sys.modules["matplotlib.figure"])
    else:
        sys.meta_path.insert(0, _FigureImportHook())

    formatter = ip.display_formatter
    native_format = formatter.format

    def _format(obj, include=None, exclude=None):
        # Looked at before formatting: rendering the figure leaves it stale.
        saved = getattr(obj, "_broker_saved_as", None)
        unchanged = getattr(obj, "stale", True) is False
        data, md = native_format(obj, include=include, exclude=exclude)
        if saved and unchanged:
            md = dict(md or {})
            md["broker_saved_as"] = list(saved)
        return data, md

    formatter.format = _format

    # The boot script kept ipykernel from importing debugpy (the debugger is
    # off; ~7 MiB per kernel).  ipykernel is loaded now: let user code import
    # it again if it wants to.
    import sys

    if "debugpy" in sys.modules and sys.modules["debugpy"] is None:
        del sys.modules["debugpy"]


_broker_sandbox_startup()
del _broker_sandbox_startup
