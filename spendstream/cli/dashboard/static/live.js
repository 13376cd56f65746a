// The live kill switch: every ControlSignal on spend.control arrives as a server-sent event with
// its table row already rendered by the server; this only puts it in place (no reload).
(function () {
  "use strict";
  const feed = document.getElementById("feed");
  const selectors = document.querySelector("form.selectors");
  if (selectors) {
    const tagBox = selectors.querySelector(".tagkey");
    const by = selectors.querySelector("#by");
    const showTag = () => {  // the tag key only with "tag…" (a disabled field is not submitted)
      if (!tagBox || !by) return;
      tagBox.hidden = by.value !== "tag";
      tagBox.querySelector("input").disabled = tagBox.hidden;
    };
    showTag();
    selectors.querySelectorAll("select").forEach((el) => el.addEventListener("change", () => {
      showTag();
      if (!by || by.value !== "tag") selectors.submit();
    }));
  }
  // The budgets table (bars, spend, states) is re-read from the server on each signal and every
  // 10 s: a signal names one window; the server puts it together with the others.
  const budgets = document.getElementById("budgets-live");
  let pending = null;
  function refreshBudgets() {
    if (!budgets || pending) return;
    pending = fetch("/fragments/budgets")
      .then((r) => (r.ok ? r.text() : null))
      .then((html) => { if (html !== null) budgets.innerHTML = html; })
      .catch(() => {})
      .finally(() => { pending = null; });
  }
  if (budgets) setInterval(refreshBudgets, 10000);
  const source = new EventSource("/events");
  source.onopen = () => { feed.className = "feed on"; feed.textContent = "● live"; };
  source.onerror = () => { feed.className = "feed off"; feed.textContent = "● reconnecting"; };
  source.onmessage = (event) => {
    const signal = JSON.parse(event.data);
    const selector = '[data-scope="' + CSS.escape(signal.scope) + '"]';
    const table = document.querySelector("#killswitch tbody");
    if (table) {
      const old = table.querySelector(selector);
      const onlyActive = document.body.querySelector("h1").textContent === "Overview";
      if (old) old.remove();
      if (!onlyActive || signal.state !== "ok") {
        table.insertAdjacentHTML("afterbegin", signal.row_html);
      }
      const count = document.getElementById("blocked-count");
      if (count) count.textContent = String(table.querySelectorAll('tr[data-state="blocked"]').length);
    }
    refreshBudgets();
    const changes = document.getElementById("changes");
    if (changes) {
      changes.insertAdjacentHTML("afterbegin", signal.change_html);
    }
    document.body.dataset.lastSignal = signal.scope + "#" + signal.sequence;
    document.body.dataset.lastSignalAt = String(Date.now());
  };
})();
