"""The web chat page in headless Chromium: send a message, see the streamed reply, regenerate, new chat."""

import shutil
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
webdriver = pytest.importorskip("selenium.webdriver")

from picochat.engine import load_engine  # noqa: E402
from picochat.serving.serve import WEB_DIR, ServeConfig, create_app  # noqa: E402
from test_chat_cli import make_tiny_checkpoint  # noqa: E402
from test_serve import ServerThread, SlowEngine  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def test_page_has_no_external_assets():
    html = (WEB_DIR / "index.html").read_text()
    assert "http://" not in html and "https://" not in html and "//cdn" not in html


@pytest.mark.skipif(not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
                    reason="chromium / chromedriver not installed")
def test_chat_in_headless_chromium(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    ckpt = make_tiny_checkpoint(tmp_path / "home")
    engine = SlowEngine(load_engine(checkpoint=str(ckpt), device="cpu")[0], delay=0.05)  # slow enough that the page is seen mid-stream
    app = create_app(ServeConfig(api_key=""), engines=[engine], model_name="picochat-web")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="picochat-chromium-", dir=tmp_path)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    with ServerThread(app) as server:
        driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=opts)
        try:
            wait = WebDriverWait(driver, 30, poll_frequency=0.05)
            driver.get(server.url + "/")
            wait.until(lambda d: "picochat-web" in d.find_element(By.ID, "model").text)
            driver.find_element(By.ID, "max_tokens").clear()
            driver.find_element(By.ID, "max_tokens").send_keys("40")
            driver.find_element(By.ID, "input").send_keys("Hello there")
            driver.find_element(By.ID, "send").click()
            # streaming: text arrives while the reply is marked streaming and Stop is enabled (checked together,
            # so a fast machine that finishes the reply cannot race the check)
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".assistant.streaming")
                       and d.find_element(By.CSS_SELECTOR, ".assistant").text
                       and d.find_element(By.ID, "stop").is_enabled())
            wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, ".assistant.streaming"))
            users = driver.find_elements(By.CSS_SELECTOR, ".msg.user")
            replies = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")
            assert [u.text for u in users] == ["Hello there"] and len(replies) == 1 and replies[0].text
            assert not driver.find_elements(By.CSS_SELECTOR, ".error")
            # regenerate replaces the last reply; new chat clears the history
            driver.find_element(By.ID, "regen").click()
            wait.until(lambda d: d.find_element(By.ID, "regen").is_enabled())
            assert len(driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == 1
            driver.find_element(By.ID, "new").click()
            assert not driver.find_elements(By.CSS_SELECTOR, ".msg")
        finally:
            driver.quit()
