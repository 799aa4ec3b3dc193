# IPython kernel configuration of Coppice's code-interpreter-v1 template, installed as
# /etc/ipython/ipython_kernel_config.py: a system-wide config directory, so that it holds for
# whichever user a sandbox's kernels run as (a profile's startup/ directory is per home).
c = get_config()  # type: ignore[name-defined]  # noqa: F821
c.InteractiveShellApp.exec_files = ["/etc/ipython/coppice_results.py"]
