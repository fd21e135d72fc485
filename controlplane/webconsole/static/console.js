// The console's enhancements. Every page works without this file: it adds the browser's
// local time beside the UTC ones, and on the jobs page it moves the progress bars while a
// job is active. No inline script exists (the CSP forbids it).
"use strict";
(function () {
  const DAYS = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
  const pad = (n) => String(n).padStart(2, "0");
  const offsetMin = -new Date().getTimezoneOffset();
  const offsetText = () => {
    const sign = offsetMin >= 0 ? "+" : "-";
    const a = Math.abs(offsetMin);
    return "UTC" + sign + pad(Math.floor(a / 60)) + ":" + pad(a % 60);
  };

  // <time datetime="...Z">: add the local time after the UTC one.
  for (const el of document.querySelectorAll("time[datetime]")) {
    const d = new Date(el.getAttribute("datetime"));
    if (isNaN(d.getTime()) || offsetMin === 0) continue;
    const local = document.createElement("span");
    local.className = "hint";
    local.textContent = " (" + DAYS[d.getDay()] + " " + d.toLocaleString() + " local)";
    el.after(local);
  }

  for (const el of document.querySelectorAll("[data-local-offset]")) {
    el.textContent = "(your browser's local time is " + offsetText() + ")";
  }

  // Schedule rows: the interval's start and end in local time (the day may shift).
  const local = (day, minute) => {
    let m = (day * 1440 + minute + offsetMin) % 10080;
    if (m < 0) m += 10080;
    return DAYS[Math.floor(m / 1440)] + " " + pad(Math.floor((m % 1440) / 60)) + ":" +
      pad(m % 60);
  };
  for (const el of document.querySelectorAll("[data-utc-days]")) {
    if (offsetMin === 0) continue;
    const days = el.getAttribute("data-utc-days").split(",").map(Number);
    const start = Number(el.getAttribute("data-utc-start"));
    const end = Number(el.getAttribute("data-utc-end"));
    const note = document.createElement("div");
    note.className = "hint";
    note.textContent = "Local: " + days.map((d) => local(d, start) + "–" +
      local(d, end).slice(4)).join(", ");
    el.append(note);
  }

  // Jobs: ask /console/jobs/live every second while a job is active; update rows in place.
  const live = document.getElementById("live");
  if (live && live.dataset.active === "yes") {
    const STOPPABLE = ["CREATED", "PENDING", "RUNNING"];
    const tick = async () => {
      let doc;
      try {
        const resp = await fetch(live.dataset.liveUrl, {credentials: "same-origin",
                                                         headers: {Accept: "application/json"}});
        if (!resp.ok) return;  // signed out or failing: the page still works by reloading
        doc = await resp.json();
      } catch (err) {
        setTimeout(tick, 5000);
        return;
      }
      for (const job of doc.jobs) {
        const row = document.querySelector('tr[data-job-id="' + CSS.escape(job.id) + '"]');
        if (!row) continue;
        row.querySelector(".state").textContent = job.state;
        row.querySelector("progress").value = job.percent;
        row.querySelector(".pct").textContent = job.percent.toFixed(1) + "%";
        row.querySelector(".msg").textContent = job.message;
        const stop = row.querySelector("form");
        if (stop && !STOPPABLE.includes(job.state)) stop.remove();
      }
      live.dataset.active = doc.active ? "yes" : "no";
      if (doc.active) setTimeout(tick, 1000);
    };
    setTimeout(tick, 1000);
  }
})();
