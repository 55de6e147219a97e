//! The sale in constant time ([`Snapshot`]), and the audit's rules over it
//! (with the full passes over the buyers and the event stream when
//! `stock audit` reads them).

/// The sale in constant time, for `stock show`, `/sale` and the start of
/// `stock audit`: counters the script keeps, never a pass over the buyers.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Snapshot {
    /// The event on sale.
    pub event: String,
    /// Whether `stock init` has written the sale.
    pub initialised: bool,
    /// Tickets on sale.
    pub total: u64,
    /// Tickets taken: with a payment window, reserved or paid.
    pub sold: u64,
    /// `total - sold` (never negative in the output).
    pub remaining: u64,
    /// Order records (every order handed out, released ones included; an
    /// order may hold several tickets).
    pub orders: u64,
    /// Distinct named buyers.
    pub buyers: u64,
    /// Tickets held by named buyers, added up (kept by the script).
    pub tickets_held: u64,
    /// The most tickets any one buyer holds (kept by the script).
    pub most_by_one_buyer: u64,
    /// The sale's epoch (the first part of every order id; 0 before the
    /// sale is initialised). A number wherever it is shown.
    pub epoch: u64,
    /// The per-user limit stored with the sale, which every node enforces.
    pub per_user_limit: u64,
    /// Unsold units that live leases hold (counted in `remaining`).
    pub leased: u64,
    /// Idempotency keys recorded (one per sale that carried one).
    pub keys: u64,
    /// Ticket numbers handed out (never goes down; an order's id ends with
    /// its last ticket's number).
    pub seq: u64,
    /// The payment window stored with the sale, in ms (0: sales are final).
    pub pay_within_ms: u64,
    /// Tickets reserved, waiting for payment.
    pub reserved: u64,
    /// Tickets paid.
    pub paid: u64,
    /// Tickets of reservations cancelled or expired: they went back on sale.
    pub released: u64,
    /// Deadline entries (one per reservation).
    pub due: u64,
    /// Events in the sale's stream now (None for the embedded store, which
    /// has no stream).
    pub events: Option<u64>,
    /// The stream's length bound stored with the sale (0: the embedded
    /// store, or a sale written before the stream existed, whose stream
    /// holds only what came after).
    pub events_max: u64,
    /// Final sales are streamed too (`[sale] stream`, stored by `stock
    /// init`); a sale with a payment window streams either way.
    pub stream: bool,
    /// When the sale opens, Unix ms (0: open since `stock init`).
    pub opens_at_ms: u64,
    /// When it closes or closed, Unix ms (0: no closing).
    pub closes_at_ms: u64,
    /// Paused by the operator (`spike stock pause`).
    pub paused: bool,
    /// The operator's changes so far (pause, resume, close, add), each an
    /// event in the stream.
    pub controls: u64,
    /// Closed by the operator (`spike stock close`).
    pub closed: bool,
    /// Sold out for good: nothing free and nothing reserved that could come
    /// back.
    pub finished: bool,
    /// Tickets beyond the first of every order created (orders of several
    /// tickets): orders created = `seq - extra`.
    pub extra: u64,
    /// The same, of the orders paid: orders paid = `paid - extra_paid`.
    pub extra_paid: u64,
    /// The same, of the orders released: `released - extra_released`.
    pub extra_released: u64,
}

impl Snapshot {
    /// Orders created in this sale (an order may hold several tickets).
    pub fn orders_created(&self) -> u64 {
        self.seq.saturating_sub(self.extra)
    }

    /// Orders paid.
    pub fn orders_paid(&self) -> u64 {
        self.paid.saturating_sub(self.extra_paid)
    }

    /// Orders cancelled or expired.
    pub fn orders_released(&self) -> u64 {
        self.released.saturating_sub(self.extra_released)
    }
}

/// What a full audit reads beyond the snapshot: a pass over every buyer, in
/// pages, so that it never holds Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BuyerTally {
    /// Tickets held by named buyers, added up from the buyers themselves.
    pub tickets_held: u64,
    /// The most any one buyer holds.
    pub most_by_one_buyer: u64,
}

/// What the sale's event stream holds since this sale began (the stream
/// outlives a reset: what came before belongs to older epochs), read in
/// pages for `stock audit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct EventTally {
    /// Events appended since the sale began, trimmed ones included (from
    /// Redis 7's `entries-added`; None when Redis does not say).
    pub added: Option<u64>,
    /// Events of this sale in the stream now.
    pub length: u64,
    /// Order creations (`sold` or `reserved`) among them.
    pub created: u64,
    /// Payments among them.
    pub paid: u64,
    /// Cancels and expiries among them.
    pub released: u64,
    /// Tickets the creations hold (an event's `quantity`, 1 when absent).
    pub created_tickets: u64,
    /// Tickets the payments hold.
    pub paid_tickets: u64,
    /// Tickets the cancels and expiries gave back.
    pub released_tickets: u64,
    /// The operator's changes among them (paused, resumed, closed, added).
    pub controls: u64,
}

/// What `stock audit` read: the snapshot and the passes that agree with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Audit {
    /// The sale's counters.
    pub snapshot: Snapshot,
    /// The pass over the buyers, when it ran while the sale stood still.
    pub buyers: Option<BuyerTally>,
    /// The stream counted up to the moment of `snapshot` (None: the
    /// embedded store, which has no stream).
    pub events: Option<EventTally>,
}

impl Audit {
    /// The broken invariants, as [`Snapshot::audit`] says them.
    pub fn problems(&self) -> Vec<String> {
        self.snapshot.audit(self.buyers, self.events)
    }
}

impl Snapshot {
    /// The invariants that must hold whatever happened during the sale; each
    /// broken one is a sentence in the result. `buyers`, when given, is the
    /// full pass over the buyers, checked against the kept counters;
    /// `events`, the pass over the event stream.
    pub fn audit(&self, buyers: Option<BuyerTally>, events: Option<EventTally>) -> Vec<String> {
        let mut problems = Vec::new();
        // The stream carries the orders of a sale with a payment window,
        // or of one with `stream` (written by this version: it has a bound).
        if let Some(e) =
            events.filter(|_| self.events_max > 0 && (self.pay_within_ms > 0 || self.stream))
        {
            // One event per order created, per payment, per release, and
            // per change of the operator's (orders, whatever their tickets).
            let changes =
                self.orders_created() + self.orders_paid() + self.orders_released() + self.controls;
            if e.added.is_some_and(|a| a != changes) {
                problems.push(format!(
                    "the event stream had {} events appended for {changes} order changes",
                    e.added.unwrap_or(0)
                ));
            }
            let untrimmed = match e.added {
                Some(a) => a == e.length,
                // Redis before 7 does not say: trust a stream well short
                // of its bound only.
                None => e.length < self.events_max / 2,
            };
            if untrimmed {
                // Nothing trimmed: every change is there, once.
                let counted = [
                    ("creations", e.created, self.orders_created()),
                    ("payments", e.paid, self.orders_paid()),
                    ("releases", e.released, self.orders_released()),
                    ("operator's changes", e.controls, self.controls),
                    ("tickets created", e.created_tickets, self.seq),
                    ("tickets paid", e.paid_tickets, self.paid),
                    ("tickets released", e.released_tickets, self.released),
                ];
                for (what, streamed, kept) in counted {
                    if streamed != kept {
                        problems.push(format!(
                            "the event stream holds {streamed} {what} but the sale counted {kept}"
                        ));
                    }
                }
            }
        }
        if !self.initialised {
            problems.push("the sale is not initialised (run `spike stock init`)".to_string());
        }
        if self.sold > self.total {
            problems.push(format!("oversold: sold {} of {}", self.sold, self.total));
        }
        if self.sold + self.leased > self.total {
            problems.push(format!(
                "leases promise more than is left: sold {} + leased {} > total {}",
                self.sold, self.leased, self.total
            ));
        }
        // Tickets: every number handed out is taken or came back.
        if self.sold + self.released != self.seq {
            problems.push(format!(
                "sold {} and released {} tickets but {} ticket numbers handed out",
                self.sold, self.released, self.seq
            ));
        }
        if self.orders != self.orders_created() {
            problems.push(format!(
                "{} orders handed out but {} order records",
                self.orders_created(),
                self.orders
            ));
        }
        if self.keys > self.orders {
            problems.push(format!(
                "{} idempotency keys recorded for {} orders",
                self.keys, self.orders
            ));
        }
        if self.pay_within_ms > 0 {
            if self.sold != self.reserved + self.paid {
                problems.push(format!(
                    "sold {} but reserved {} + paid {}",
                    self.sold, self.reserved, self.paid
                ));
            }
            // One deadline entry per order still reserved.
            let open = self
                .orders_created()
                .saturating_sub(self.orders_paid() + self.orders_released());
            if self.due != open {
                problems.push(format!(
                    "{open} reservations but {} deadline entries",
                    self.due
                ));
            }
        } else if self.reserved + self.paid + self.released > 0 {
            problems.push(format!(
                "final sales, yet reserved {}, paid {}, released {}",
                self.reserved, self.paid, self.released
            ));
        }
        let limit = self.per_user_limit;
        if limit > 0 {
            if self.most_by_one_buyer > limit {
                problems.push(format!(
                    "a buyer holds {} tickets, over the limit of {limit}",
                    self.most_by_one_buyer
                ));
            }
            if self.tickets_held != self.sold {
                problems.push(format!(
                    "buyers hold {} tickets but {} were sold",
                    self.tickets_held, self.sold
                ));
            }
        }
        if let Some(b) = buyers {
            if b.tickets_held != self.tickets_held {
                problems.push(format!(
                    "the buyers hold {} tickets but the sale counted {}",
                    b.tickets_held, self.tickets_held
                ));
            }
            if limit > 0 && b.most_by_one_buyer > limit {
                problems.push(format!(
                    "a buyer holds {} tickets, over the limit of {limit}",
                    b.most_by_one_buyer
                ));
            }
        }
        problems
    }
}
