"""The chat page in a real headless Chromium: upload a picture (or a point cloud), ask, read the streamed answer."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from pipelines.infer import stage as infer
from pipelines.runtime.inputs import Request
from tests.pipelines.test_infer import trained  # noqa: F401 (the served model's fixture)
from tests.pipelines.test_serve import server  # noqa: F401 (the server on loopback)

QUESTIONS = ("What colour is the shape?", "What shape is it?")


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    chromium, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("no chromium/chromedriver on this machine: `make browser` installs Debian's (as root, with apt)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    session = webdriver.Chrome(service=Service(driver), options=options)
    yield session
    session.quit()


def _answer(browser, index: int, timeout: float = 120) -> str:
    from selenium.webdriver.support.ui import WebDriverWait

    def done(d) -> bool:
        answers = d.find_elements("css selector", "#log .assistant, #log .error")
        return len(answers) > index and answers[index].get_attribute("data-done") == "true"

    WebDriverWait(browser, timeout).until(done)
    element = browser.find_elements("css selector", "#log .assistant, #log .error")[index]
    return element.get_attribute("textContent").strip()  # as streamed in, not as rendered


def test_upload_ask_and_read_the_streamed_answer(server, browser) -> None:  # noqa: F811
    url, cfg, f = server
    browser.get(url)
    assert "ibllm chat" in browser.title
    browser.find_element("id", "file").send_keys(f["jpg"])
    browser.find_element("id", "question").send_keys(QUESTIONS[0])
    browser.find_element("id", "send").click()
    first = _answer(browser, 0)
    expected = infer.run(cfg, Request(image=[f["jpg"]], prompt=QUESTIONS[0], temperature=0.0)).answers[0].answer
    assert first == expected and first
    assert browser.find_elements("css selector", "#inputs img")  # the picture is shown
    browser.find_element("id", "question").send_keys(QUESTIONS[1])
    browser.find_element("id", "send").click()
    second = _answer(browser, 1)
    follow = Request(image=[f["jpg"]], prompt=QUESTIONS[1], temperature=0.0, history=[(QUESTIONS[0], first)])
    assert second == infer.run(cfg, follow).answers[0].answer  # the page kept the conversation


def test_a_point_cloud_file_goes_as_a_point_cloud_part(server, browser, tmp_path) -> None:  # noqa: F811
    import numpy as np

    url, cfg, _ = server
    cloud = tmp_path / "object.npy"
    np.save(cloud, np.random.default_rng(1).normal(size=(90, 3)).astype(np.float32))
    browser.get(url)
    browser.find_element("id", "file").send_keys(str(cloud))
    browser.find_element("id", "question").send_keys(QUESTIONS[1])
    browser.find_element("id", "send").click()
    expected = infer.run(cfg, Request(point=[str(cloud)], prompt=QUESTIONS[1], temperature=0.0)).answers[0].answer
    assert _answer(browser, 0) == expected
