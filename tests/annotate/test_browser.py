"""The page in a real browser: headless Chromium (Debian's chromium and chromium-driver, driven by Selenium with
the system chromedriver, so nothing is downloaded) clicks and types through annotating pairs and a blind
evaluation against a real server, and takes the README's screenshots (into $PREFTUNE_SCREENSHOTS when set)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from annotate_helpers import start_server, write_jsonl

from preftune.annotate.results import annotation_report, preference_rows
from preftune.annotate.store import AnnotationStore

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
pytestmark = pytest.mark.skipif(not (os.path.isfile(CHROMIUM) and os.path.isfile(CHROMEDRIVER)),
                                reason=f"needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}): "
                                "apt-get install -y chromium chromium-driver (.ci/run does)")

ATTACK = ' <script>window.pwned = 1</script><img src=x onerror="window.pwned = 2"> is the whole answer'
PAIRS = [
    {"prompt": "Review 1: <b>the film</b> was", "chosen": ATTACK, "rejected": " dull.", "score_chosen": 0.9,
     "score_rejected": 0.1},
    {"prompt": "Review 2: the acting was", "chosen": " warm and sure of itself.", "rejected": " fine, I guess.",
     "score_chosen": 0.8, "score_rejected": 0.4},
    {"prompt": "Review 3: the ending was", "chosen": " moving.", "rejected": " a mess.", "score_chosen": 0.7,
     "score_rejected": 0.2},
]
CHAT = [{"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Is the sea cold?"}],
         "chosen": [{"role": "assistant", "content": "A little, in spring; lovely by August."}],
         "rejected": [{"role": "assistant", "content": "Look it up."}], "score_chosen": 0.9, "score_rejected": 0.0}]
SAMPLES = [{"prompt": f"Tell me about {topic}.", "policy": policy, "reference": reference, "policy_score": s,
            "reference_score": r, "judge": "gold", "sample": 0}
           for topic, policy, reference, s, r in [
               ("the night sky", " It is full of quiet stars, a joy to watch.", " It is dark.", 0.93, 0.41),
               ("a rainy day", " Perfect for a book and a warm cup of tea.", " Wet. Stay in.", 0.88, 0.30),
               ("the city park", " A green place to walk.", " A green place to walk!", 0.60, 0.62)]]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    server = start_server(root / "annotations.sqlite",
                          "--pairs", str(write_jsonl(root / "pairs.jsonl", PAIRS)),
                          "--pairs", str(write_jsonl(root / "chat.jsonl", CHAT)),
                          "--samples", str(write_jsonl(root / "samples.jsonl", SAMPLES)))
    server.root = root
    yield server
    server.process.kill()
    server.process.wait(timeout=20)
    server.process.stdout.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1000,720", "--force-device-scale-factor=1",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    # The system chromedriver, named explicitly: Selenium Manager is never asked to download one.
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _screenshot(driver, name: str, tmp_path: Path) -> Path:
    folder = Path(os.environ.get("PREFTUNE_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    driver.save_screenshot(str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return path


def _console_errors(driver) -> list[str]:
    """The page's console errors, but the favicon the page does not have."""
    return [e["message"] for e in driver.get_log("browser")
            if e["level"] == "SEVERE" and "favicon.ico" not in e["message"]]


def _text(driver, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id).get_attribute("textContent")


def _wait_for_item(driver, previous: str | None) -> str:
    """Wait until a new item is shown and the choices are enabled again; returns its prompt's text."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def ready(d):
        if d.find_element(By.ID, "work").get_attribute("hidden") is not None:
            return False
        prompt = _text(d, "prompt")
        return prompt if prompt and prompt != previous and d.find_element(By.ID, "choose-left").is_enabled() else False

    return WebDriverWait(driver, 15).until(ready)


def _wait_for_text(driver, element_id: str, text: str) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 15).until(lambda d: text in _text(d, element_id))


def _sign_in(driver, name: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    field = driver.find_element(By.ID, "annotator")
    field.clear()
    field.send_keys(name, Keys.ENTER)


def _press(driver, key: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).send_keys(key).perform()


def test_annotating_pairs_in_the_browser(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    client = server.client
    browser.get(f"{client.origin}/?task=pairs#token={client.token}")
    assert "#token" not in browser.current_url  # taken out of the address bar at once
    _wait_for_text(browser, "status", "Enter your name")
    _sign_in(browser, "alice")
    by_prompt = {json.dumps(r["prompt"]): r for r in PAIRS + CHAT}
    previous, seen = None, []
    for step in range(4):
        previous = _wait_for_item(browser, previous)
        _wait_for_text(browser, "progress-text", f"{step} of 4 done by you")
        left = _text(browser, "left")
        if previous.startswith("Review 1"):
            # Shown as text, in the real browser: the <script> did not run, the <img> is not an element.
            assert ATTACK in (left, _text(browser, "right")) and "<b>the film</b>" in previous
            assert browser.execute_script("return window.pwned === undefined")
            assert browser.find_elements(By.CSS_SELECTOR, "#work img, #work script, #work b") == []
            _press(browser, "1" if left == ATTACK else "2")  # the file's chosen, by keyboard
        elif previous.startswith("Review 2"):
            note = browser.find_element(By.ID, "note")
            _press(browser, "n")  # N jumps to the note; keys typed there are text, not votes
            assert browser.switch_to.active_element == note
            note.send_keys("b is fine too, a is better", Keys.ESCAPE)
            chosen_left = left.strip() == PAIRS[1]["chosen"].strip()
            browser.find_element(By.ID, "choose-right" if chosen_left else "choose-left").click()  # the rejected
        elif previous.startswith("Review 3"):
            _press(browser, "t")
        else:  # the conversation: roles and messages shown
            assert "system" in previous and "Be kind." in previous and "Is the sea cold?" in previous
            assert "assistant" in left
            _screenshot(browser, "annotate-pairs.png", tmp_path)
            _press(browser, "a" if "lovely by August" in left else "b")
        seen.append(previous)
    _wait_for_text(browser, "done-text", "All done, alice: you labelled 4 items here.")
    assert len(set(seen)) == 4
    assert _console_errors(browser) == []  # no script error, no Content-Security-Policy violation

    with AnnotationStore(server.db, create=False) as store:
        votes = store.votes("pairs")
        assert [(v["annotator"], v["label"]) for v in votes] == [("alice", "a"), ("alice", "b"), ("alice", "tie"),
                                                                 ("alice", "a")]
        assert votes[1]["note"] == "b is fine too, a is better"
        rows, report = preference_rows(store, source=str(server.root / "pairs.jsonl"))
    assert (report.exported, report.tie) == (2, 1)
    assert rows[0]["chosen"] == ATTACK and rows[1]["chosen"] == PAIRS[1]["rejected"]
    assert json.dumps(rows[0]["prompt"]) in by_prompt


def test_a_blind_evaluation_in_the_browser(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    client = server.client
    browser.get(f"{client.origin}/?task=pairs#token={client.token}")
    _sign_in(browser, "bob")
    _wait_for_text(browser, "done-text", "All done, bob: you labelled 0 items")  # alice gave every pair its vote
    browser.find_element(By.ID, "task-eval").click()  # the other task, by its tab
    previous = None
    for step in range(3):
        previous = _wait_for_item(browser, previous)
        assert "task=eval" in browser.current_url and "Blind evaluation" in _text(browser, "question")
        page = browser.find_element(By.TAG_NAME, "body").get_attribute("textContent").lower()
        assert re.search(r"\b(policy|reference|judge|gold)\b|0\.93", page) is None, page  # nothing unblinds
        left, right = _text(browser, "left"), _text(browser, "right")
        sample = next(s for s in SAMPLES if s["prompt"] == previous)
        if step == 0:
            _screenshot(browser, "annotate-eval.png", tmp_path)
        if "city park" in previous:
            _press(browser, "3")  # too close to call
        else:
            _press(browser, "1" if left == sample["policy"] else "2")  # the policy's answer is the better one here
        assert {left, right} == {sample["policy"], sample["reference"]}
    _wait_for_text(browser, "done-text", "All done, bob: you labelled 3 items here.")
    assert _console_errors(browser) == []

    with AnnotationStore(server.db, create=False) as store:
        report = annotation_report(store)["eval"]
    human, judge = report["human_win_rate"], report["judge_win_rate"]
    assert (human["wins"], human["losses"], human["ties"]) == (2, 0, 1)
    assert human["value"] == pytest.approx(2.5 / 3)  # ties count ½
    assert judge["value"] == pytest.approx(2 / 3) and judge["judge"] == "gold"


GUIDE = ("# How to judge\n\nPrefer **honest** answers over *flowery* ones.\n"
         "<script>window.pwned = 3</script><img src=x onerror=\"window.pwned = 4\">\n\n- read both\n- then vote\n")


@pytest.fixture(scope="module")
def team_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("team")
    (root / "guide.md").write_text(GUIDE, encoding="utf-8")
    server = start_server(root / "annotations.sqlite", "--pairs", str(write_jsonl(root / "pairs.jsonl", PAIRS)),
                          "--guidelines", str(root / "guide.md"))
    yield server
    server.process.kill()
    server.process.wait(timeout=20)
    server.process.stdout.close()


def test_guidelines_undo_and_skip_in_the_browser(team_server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    client = team_server.client
    browser.get(f"{client.origin}/?task=pairs#token={client.token}")
    _wait_for_text(browser, "guidelines", "How to judge")
    # The Markdown's own markup is made (a heading, bold, a list); the HTML in it is text, and never ran.
    guide = browser.find_element(By.ID, "guidelines")
    assert [e.text for e in guide.find_elements(By.CSS_SELECTOR, "h3, strong, em, li")] == [
        "How to judge", "honest", "flowery", "read both", "then vote"]
    assert '<script>window.pwned = 3</script><img src=x onerror="window.pwned = 4">' in _text(browser, "guidelines")
    assert guide.find_elements(By.CSS_SELECTOR, "script, img") == []
    assert browser.execute_script("return window.pwned === undefined")

    _sign_in(browser, "carol")
    first = _wait_for_item(browser, None)
    assert browser.find_element(By.ID, "undo").get_attribute("disabled") is not None  # nothing to undo yet
    browser.find_element(By.ID, "note").send_keys("first thoughts", Keys.ESCAPE)
    _press(browser, "1")
    second = _wait_for_item(browser, first)
    browser.find_element(By.ID, "undo").click()  # back to the first item, its note restored
    _wait_for_text(browser, "status", "Your last vote (A is better) is withdrawn")
    assert _wait_for_item(browser, second) == first
    assert browser.find_element(By.ID, "note").get_attribute("value") == "first thoughts"
    _wait_for_text(browser, "progress-text", "0 of 3 done by you")
    _press(browser, "3")  # voted anew: a tie
    assert _wait_for_item(browser, first) == second
    _press(browser, "s")  # skip the second: the third comes, the second after it
    _wait_for_text(browser, "status", "Skipped")
    third = _wait_for_item(browser, second)
    _press(browser, "2")
    assert _wait_for_item(browser, third) == second
    _press(browser, "1")
    _wait_for_text(browser, "done-text", "All done, carol: you labelled 3 items here.")
    _press(browser, "u")  # the last vote can be undone from the end screen too
    assert _wait_for_item(browser, None) == second
    _press(browser, "4")
    _wait_for_text(browser, "done-text", "All done, carol")
    assert _console_errors(browser) == []

    with AnnotationStore(team_server.db, create=False) as store:
        votes = store.votes("pairs")
        prompts = {i["id"]: i["prompt"] for i in store.items("pairs")}
        assert [(prompts[v["item_id"]], v["choice"]) for v in votes] == [(first, "tie"), (third, "right"),
                                                                         (second, "both_bad")]
        assert store.changes("pairs") == {"carol": {"retracted": 2, "skipped": 1}}


def test_the_overview_in_the_browser(team_server, browser):
    from selenium.webdriver.common.by import By

    client = team_server.client
    browser.get(f"{client.origin}/overview#token={team_server.admin_token}")
    _wait_for_text(browser, "overview-pairs", "carol")
    rows = [[td.text for td in tr.find_elements(By.TAG_NAME, "td")]
            for tr in browser.find_elements(By.CSS_SELECTOR, "#overview-pairs tr")][1:2]
    assert rows == [["carol", "3", "2", "1"]]
    assert "3 of 3 items have 1 vote · 3 votes" in _text(browser, "overview-pairs")
    assert "#token" not in browser.current_url
    browser.get("about:blank")  # a new load (a change of fragment alone would not reload the page)
    browser.get(f"{client.origin}/overview#token={client.token}")  # the annotators' token does not open it
    _wait_for_text(browser, "status", "missing or wrong admin token")
    assert all("status of 401" in e for e in _console_errors(browser))  # the refused request, nothing else


def test_the_browser_tests_use_the_system_chromium():
    assert shutil.which("chromium") == CHROMIUM or os.path.isfile(CHROMIUM)
