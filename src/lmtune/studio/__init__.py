"""`lmtune studio`: a local web page to configure a run (form generated from `RunConfig`), see its memory estimate
live, launch and watch `lmtune train` processes, stop them cleanly, chat with a result and compare runs.

Standard library HTTP server + one static page in plain JavaScript: nothing to build, nothing extra to install.
"""
