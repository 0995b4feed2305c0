"""The kernels' argument lists stay short: no `@triton.jit` function takes more than 20 parameters and
no call from one to another passes more than 16 positional arguments. Arguments travel as bundles
(a tensor's strides as one tuple, the scores' runtime scalars as one named tuple, the compile-time
switches as one constexpr named tuple), so two adjacent strides cannot be swapped unseen and a new
runtime scalar is one field, not forty edits.

Read from the source (the AST), as a reviewer counts them. `python tests/test_kernel_signatures.py`
prints every function's count.
"""

import ast
from pathlib import Path

KERNELS = Path(__file__).resolve().parent.parent / "kernels"
MAX_PARAMETERS = 20
MAX_POSITIONAL = 16


def _is_jit(decorator):
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    return isinstance(target, ast.Attribute) and target.attr == "jit"


def jit_functions():
    """{name: (file, FunctionDef)} of every @triton.jit function under kernels/."""
    found = {}
    for path in sorted(KERNELS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and any(_is_jit(d) for d in node.decorator_list):
                found[node.name] = (path.name, node)
    return found


def parameter_counts(functions):
    return {name: len(node.args.args) + len(node.args.kwonlyargs) for name, (_, node) in functions.items()}


def jit_calls(functions):
    """[(caller, callee, positional arguments)] of every call from one jit function to another."""
    calls = []
    for caller, (_, node) in functions.items():
        for call in ast.walk(node):
            if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id in functions:
                calls.append((caller, call.func.id, len(call.args)))
    return calls


def over_limits(functions):
    """{function: why} for each function whose parameters, or whose calls' positional arguments, break a limit."""
    why = {name: f"{count} parameters" for name, count in parameter_counts(functions).items()
           if count > MAX_PARAMETERS}
    for caller, callee, count in jit_calls(functions):
        if count > MAX_POSITIONAL:
            why.setdefault(caller, f"calls {callee} with {count} positional arguments")
    return why


def test_kernels_keep_within_the_limits():
    functions = jit_functions()
    assert len(functions) > 30  # the AST finds the kernels (a renamed decorator would hide them)
    assert over_limits(functions) == {}


if __name__ == "__main__":
    functions = jit_functions()
    counts = parameter_counts(functions)
    widest = {}
    for caller, callee, count in jit_calls(functions):
        widest[caller] = max(widest.get(caller, 0), count)
    print(f"{'function':28s} {'file':18s} params  widest jit call (positional)")
    for name in sorted(functions, key=lambda n: -counts[n]):
        print(f"{name:28s} {functions[name][0]:18s} {counts[name]:6d}  {widest.get(name, 0)}")
    print(f"{len(functions)} jit functions; over the limits: {len(over_limits(functions))}")
