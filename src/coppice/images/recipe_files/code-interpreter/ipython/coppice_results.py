"""IPython start-up of Coppice's code-interpreter-v1 template: E2B's two extra result types.

E2B's code-interpreter image gives display data two MIME types of its own, which its SDK
reads into `Result.data` and `Result.chart` (the agent's kernel_output.py maps them):

* `e2b/data`: a pandas DataFrame as `{column: [values]}`;
* `e2b/chart`: a matplotlib figure as the `e2b_charts` package describes it (type, title,
  axes, elements), so that a client can redraw it.

Both are IPython display formatters, so they apply wherever a value is displayed: a cell's
result, `display()`, and the inline backend showing a figure on `plt.show()` or at the end
of a cell. They import nothing until the user has imported pandas or matplotlib (a DataFrame
or a Figure cannot exist before), so a kernel starts as fast as without them.

The file runs in the user's namespace (`InteractiveShellApp.exec_files`, set in
ipython_kernel_config.py beside it); everything it defines is deleted again at the end.
"""


def _coppice_install_result_formatters() -> None:
    import math
    import sys
    from typing import Any

    from IPython import get_ipython
    from IPython.core.formatters import BaseFormatter
    from traitlets import ObjectName, Unicode

    def plain(value: Any) -> Any:
        # NaN and infinities are not JSON: the kernel's message would fail to serialise and
        # the whole display would be lost. None is what a JSON client reads as missing.
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if hasattr(value, "isoformat"):  # pandas.Timestamp, datetime, date
            return value.isoformat()
        return value

    class DataFrameData(BaseFormatter):
        format_type = Unicode("e2b/data")
        print_method = ObjectName("_repr_e2b_data_")
        _return_type = (dict,)

        def __call__(self, obj: Any) -> Any:
            pandas = sys.modules.get("pandas")
            if pandas is None or not isinstance(obj, pandas.DataFrame):
                return super().__call__(obj)
            try:
                columns = obj.to_dict(orient="list")
                return {str(k): [plain(v) for v in values] for k, values in columns.items()}
            except Exception:
                return None  # the other representations of the frame still go out

    class FigureChart(BaseFormatter):
        format_type = Unicode("e2b/chart")
        print_method = ObjectName("_repr_e2b_chart_")
        _return_type = (dict,)

        def __call__(self, obj: Any) -> Any:
            figure = sys.modules.get("matplotlib.figure")
            if figure is None or not isinstance(obj, figure.Figure):
                return super().__call__(obj)
            try:
                from e2b_charts import chart_figure_to_dict

                chart = chart_figure_to_dict(obj)
            except Exception:
                # A figure e2b_charts cannot read still shows as its PNG.
                return None
            return chart or None  # an empty figure has no chart

    shell = get_ipython()
    if shell is None:
        return
    formatters = shell.display_formatter.formatters
    for formatter_class in (DataFrameData, FigureChart):
        formatter = formatter_class(parent=shell.display_formatter)
        formatters[formatter.format_type] = formatter


_coppice_install_result_formatters()
del _coppice_install_result_formatters
