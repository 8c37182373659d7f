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


_broker_sandbox_startup()
del _broker_sandbox_startup
