"""The real-webui test harness runs the extension's installer before it starts the webui
(which it starts with --skip-install), checked against a fake webui checkout."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from a1111.harness import InstallerFailed, running_webui

_LAUNCH_UTILS = '''
from pathlib import Path

def run_extension_installer(extension_dir):
    if (Path(extension_dir) / "install.py").is_file():
        Path("installed.marker").write_text(str(extension_dir))
    if Path("installer_fails").exists():
        print("Error running install.py for extension x.")
'''

_LAUNCH = '''
import sys, time
from pathlib import Path
assert "--skip-install" in sys.argv
print("installed first" if Path("installed.marker").is_file() else "started without the installer")
print("webui up", flush=True)
time.sleep(60)
'''


def _fake_webui(tmp_path: Path) -> Path:
    webui = tmp_path / "webui"
    (webui / "modules").mkdir(parents=True)
    (webui / "modules" / "__init__.py").write_text("")
    (webui / "modules" / "launch_utils.py").write_text(_LAUNCH_UTILS)
    (webui / "launch.py").write_text(_LAUNCH)
    return webui


def test_installer_runs_before_the_webui_starts(tmp_path):
    webui = _fake_webui(tmp_path)
    with running_webui(webui, sys.executable, tmp_path, tmp_path / "data", [], ready="webui up") as ui:
        assert "installed first" in ui.log.read_text()
    assert (webui / "installed.marker").read_text().endswith("sd-webui-medical-diffusion")


def test_a_failed_installer_stops_before_the_webui_starts(tmp_path):
    webui = _fake_webui(tmp_path)
    (webui / "installer_fails").write_text("")
    with pytest.raises(InstallerFailed, match="install.py failed"):
        with running_webui(webui, sys.executable, tmp_path, tmp_path / "data", [], ready="webui up"):
            pass
    assert not (tmp_path / "webui.log").exists()
