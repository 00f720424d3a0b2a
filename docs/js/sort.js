// Sortable tables: every table inside an element of class "sortable" sorts by a column when its header is clicked
// (numbers by value, the first number in a cell; text alphabetically; empty cells last); a second click reverses.
(function () {
  "use strict";
  function key(cell) {
    var text = (cell.textContent || "").trim();
    var match = text.replace(/,/g, "").match(/^[^0-9+\-.]*([+\-]?\d*\.?\d+(?:e[+\-]?\d+)?)/i);
    return { empty: text === "" || text === "-", num: match ? parseFloat(match[1]) : NaN, text: text.toLowerCase() };
  }
  function compare(a, b) {
    if (a.empty !== b.empty) return a.empty ? 1 : -1;
    if (!isNaN(a.num) && !isNaN(b.num)) return a.num - b.num;
    if (!isNaN(a.num) !== !isNaN(b.num)) return isNaN(a.num) ? 1 : -1;
    return a.text < b.text ? -1 : a.text > b.text ? 1 : 0;
  }
  function sortBy(table, column, header) {
    var body = table.tBodies[0];
    var ascending = header.getAttribute("aria-sort") !== "ascending";
    var rows = Array.prototype.slice.call(body.rows).map(function (row, index) {
      return { row: row, index: index, key: key(row.cells[column] || row.cells[0]) };
    });
    rows.sort(function (a, b) {
      var order = compare(a.key, b.key);
      if (a.key.empty || b.key.empty) return order || a.index - b.index;  // empty cells stay last both ways
      return (ascending ? order : -order) || a.index - b.index;
    });
    rows.forEach(function (r) { body.appendChild(r.row); });
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th) { th.removeAttribute("aria-sort"); });
    header.setAttribute("aria-sort", ascending ? "ascending" : "descending");
  }
  function init() {
    document.querySelectorAll(".sortable table").forEach(function (table) {
      if (!table.tHead || table.dataset.sortable) return;
      table.dataset.sortable = "1";
      Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, column) {
        th.classList.add("sortable-header");
        th.title = "sort by this column";
        th.addEventListener("click", function () { sortBy(table, column, th); });
      });
    });
  }
  if (typeof document$ !== "undefined") { document$.subscribe(init); }  // mkdocs-material's page-load stream
  else if (document.readyState === "loading") { document.addEventListener("DOMContentLoaded", init); }
  else { init(); }
})();
