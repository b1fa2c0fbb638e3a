"""Run by the WebUI (in its own Python, with `launch` importable) when the extension is installed or started.

Installs only what is missing and never touches the host's torch, gradio or safetensors pins. A1111 1.10.x
already ships scipy (through scikit-image), torch, numpy and safetensors, so this normally installs nothing.
"""

import launch

# import name -> pip requirement; versions are lower bounds only, the host's pins win.
REQUIREMENTS = {
    "scipy": "scipy>=1.10",
    "safetensors": "safetensors>=0.4",
    "numpy": "numpy>=1.24",
}

for dist, requirement in REQUIREMENTS.items():
    if not launch.is_installed(dist):
        launch.run_pip(f'install "{requirement}"', f"{requirement} for the Re-Basin extension")
