"""app.py in a real browser: headless Chromium (Debian's chromium and chromium-driver) opens the page, clicks
"Sample", waits for the images and saves a screenshot. Skipped where Chromium is not installed (.ci/run installs it).

VQGAN_SCREENSHOT=path.png keeps the screenshot there (docs/assets/app.png is made so, with a trained model)."""
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

import app
from helpers import write_tiny_checkpoints

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver "
                                 "(apt-get install chromium chromium-driver)")]


def chromium():
    """Headless Chromium through Debian's chromedriver; it looks up no host but this machine."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900",
                 "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))


def test_sample_button_shows_images(tmp_path):
    checkpoint = os.environ.get("VQGAN_APP_CHECKPOINT")  # a trained model for the docs' screenshot
    if checkpoint is None:
        _, _, checkpoint = write_tiny_checkpoints(tmp_path)
    threads = torch.get_num_threads()
    page = app.main(app.build_parser().parse_args(["--checkpoint-path", str(checkpoint), "--threads", "1"]),
                    launch=False)
    app.serve(page, block=False)
    browser = chromium()
    try:
        browser.get(page.local_url)
        wait = WebDriverWait(browser, 120)
        wait.until(expected_conditions.element_to_be_clickable((By.ID, "sample-button"))).click()
        images = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#samples img") or False)
        wait.until(lambda b: all(b.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i)
                                 for i in images))
        assert len(images) == 8  # the page's default number of images
        assert browser.execute_script("return arguments[0].naturalWidth", images[0]) == 32  # the models' size
        shot = Path(os.environ.get("VQGAN_SCREENSHOT", tmp_path / "app.png"))
        browser.save_screenshot(str(shot))
    finally:
        browser.quit()
        page.close()
        torch.set_num_threads(threads)
    with Image.open(shot) as image:  # a real rendering: not a blank page
        colours = np.unique(np.asarray(image.convert("RGB")).reshape(-1, 3), axis=0)
    assert image.width == 1280 and len(colours) > 16
